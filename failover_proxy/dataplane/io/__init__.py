"""Connection I/O shared by the codecs: one owner per connection, batched reads, direct writes."""
