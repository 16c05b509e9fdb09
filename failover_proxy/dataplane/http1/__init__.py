"""The HTTP/1.1 codec: the client protocol, backend connections, framing and headers."""
