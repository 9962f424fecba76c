"""The native protocol (``gradserve.v1``): ``service`` holds the servicers, ``encoding`` builds
the answer messages from the data plane's results."""
