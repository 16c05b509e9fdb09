"""The data plane: the protocol-neutral exchange (the modules here) and the codecs under it
(http1/: HTTP/1.1 on llhttp; io/: connection I/O), joined by the streams of streams.py."""
