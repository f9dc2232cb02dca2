"""Stand-in for the WebUI's ``modules`` package (AUTOMATIC1111 v1.10.1), for tests without a WebUI."""
