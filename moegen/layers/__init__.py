"""Small blocks shared by every model family and by the engine.

Blocks hold no weights: each takes a mapping from checkpoint-style names to tensors, so the
engine can hand them host tensors or streamed device copies alike.
Shape letters: T tokens (flat, ragged batch), H hidden, N query heads, K kv heads, D head dim,
E experts, I expert intermediate size, V vocab.
"""
