"""The data plane: our own HTTP/1.1 protocol code on uvloop and llhttp (httptools)."""
