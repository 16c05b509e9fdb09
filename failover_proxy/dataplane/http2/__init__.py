"""The HTTP/2 codec: clients with prior knowledge (h2c) on the HTTP/1.1 port, for now."""
