"""The wire formats. Each front-end parses its requests into the data plane's neutral types,
runs them inside the call envelope (``ops.calls``) and encodes the plain results it gets back:

- ``native`` — ``gradserve.v1`` SensitivityService and ModelService;
- ``oip`` — the Open Inference Protocol over gRPC and REST;
- ``gsa`` — ``gradserve.v1`` GlobalSensitivityService (Analyze);
- ``rawbytes`` — request bytes parsed by our code, so malformed ones are INVALID_ARGUMENT.
"""
