"""The server as a process: ``app`` assembles the gRPC server, health, reflection
(``reflection``), the REST app and model loading; ``cli`` is the ``gradserve`` command (its client
subcommands live with the SDK, ``gradserve._cli``); ``supervisor`` runs ``serve --workers N``."""
