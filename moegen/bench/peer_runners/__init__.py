"""Scripts that run *inside a peer's own environment* (see moegen.bench.peers), started by path
with the peer's python. They import the standard library and the peer only, never moegen, and
speak JSON lines with the benchmark system that started them."""
