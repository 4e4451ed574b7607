"""One server process: settings, logging, metrics, TLS files, assembling and running it."""
