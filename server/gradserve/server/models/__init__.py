"""The models a server hosts: ``repository`` finds, loads and versions them (LOADING -> READY ->
UNLOADING), ``loading`` reads .keras files and SavedModels safely, ``modelfn`` wraps each as one
callable with a signature, ``demo`` builds the built-in demo models. Compiling a loaded model is
the compute layer's (``compute.compiler``), handed to the repository as its ``Compiler``."""
