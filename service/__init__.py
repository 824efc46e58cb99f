"""The job service: HTTP API, records and artifact store."""
