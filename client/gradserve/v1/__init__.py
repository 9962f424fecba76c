"""Generated gRPC and protobuf modules for package gradserve.v1 (see tools/gen_protos.py)."""
