"""When a sequence stops: an EOS or stop id, a stop string in its text, or its length limit."""


def eos_ids(eos) -> tuple:
    """A config's eos_token_id (None, an id or a list of ids) as a tuple."""
    if eos is None:
        return ()
    return tuple(int(v) for v in eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def finish_reason(seq, token: int, eos: tuple, tokenizer) -> str | None:
    """Why `seq` ends with `token`, just appended to its output ("stop" or "length"), or None
    while it goes on. A stop string also cuts seq.text where it begins."""
    p = seq.params
    if (not p.ignore_eos and token in eos) or token in p.stop_token_ids:
        return "stop"
    if p.stop and tokenizer is not None and hit_stop_string(seq, tokenizer):
        return "stop"
    if len(seq.output) >= p.max_new_tokens:
        return "length"
    return None


def hit_stop_string(seq, tokenizer) -> bool:
    """Whether the text so far holds a stop string; if so seq.text is the text before the first."""
    # a stop string of L characters spans at most L tokens: decode the tail only, the whole text
    # only once the tail holds one
    window = max(len(s) for s in seq.params.stop) + 2
    tail = tokenizer.decode(seq.output[-window:])
    if not any(s in tail for s in seq.params.stop):
        return False
    text = tokenizer.decode(seq.output)
    cut = min((text.find(s) for s in seq.params.stop if s in text), default=-1)
    if cut < 0:
        return False
    seq.text = text[:cut]
    return True
