"""OpenAI batch files, as the OpenAI Batch API and `vllm run-batch` take them, over one engine call.

An input row (JSONL):
    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 32}}
with url "/v1/chat/completions" (body.messages, through the checkpoint's chat template) or
"/v1/completions" (body.prompt: a string or a list of token ids). Body fields: max_tokens /
max_completion_tokens (unset: the caller's default), temperature, top_p, top_k, stop (a string
or a list), seed, n, model (echoed back), user / metadata / store (ignored), and log-probabilities
(chat: logprobs true with top_logprobs K; completions: logprobs K) answered in each choice's
`logprobs` in OpenAI's shape (chat: {"content": [{token, logprob, bytes, top_logprobs}]};
completions: {tokens, token_logprobs, top_logprobs, text_offset}, top_logprobs holding the chosen
token and the K most likely), under the model's raw distribution (moegen.engine.params.Completion);
a token is its decoded text ("token_id:N" on an engine without a tokenizer). Other fields are
refused unless they ask for nothing (stream false, echo false, penalties 0, ...).

Unset sampling fields take the checkpoint's generation_config.json (when it says do_sample), else
OpenAI's API defaults (temperature 1, top_p 1) -- so a row without a temperature samples, as it
would from OpenAI or vLLM. A seeded row draws from seed + its position in the engine call; its
n choices are the engine's n samples of one prefill (seed + position * n + choice).

An output row, one per input row and in input order:
    {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error", "index"}
(`index`: the input line's place among the file's requests, by which the generation journal resumes
a file after a crash: a re-run answers only the lines the output lacks).
body is a chat.completion or text_completion object with `usage`. A row that cannot be served
(not JSON, unknown url, no body, a prompt too long, ...) is answered with status_code 400, the
OpenAI error object as body ({"error": {"message", "type", ...}}) and `error` {"code", "message"};
it never stops the others; nor does a custom_id used twice (the later rows are answered with an
error, as the Batch API requires unique ids). Every valid row goes to the engine in one call, so module batching
sees the whole batch.
"""
import json
import sys
import time
import uuid
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import accumulate
from pathlib import Path

from moegen.engine.params import SamplingParams, encode_prompt
from moegen.engine.sampler import check_logprob_counts
from moegen.errors import InputError, MoegenError
from moegen.jsonl import STDIN

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
OPENAI_SAMPLING = {"temperature": 1.0, "top_p": 1.0}     # the API's defaults for unset fields
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "user", "metadata", "store"}
_FIELDS = {CHAT: _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"},
           COMPLETIONS: _COMMON | {"prompt", "logprobs"}}
# fields moegen cannot honour, accepted only with the value that asks for nothing
_NO_OP = {"stream": (False, None), "stream_options": (None,), "top_logprobs": (0, None),
          "echo": (False, None), "best_of": (1, None), "presence_penalty": (0, None),
          "frequency_penalty": (0, None), "logit_bias": (None, {}), "response_format": (None, {"type": "text"})}
_NUMBERS = {"temperature": (int, float), "top_p": (int, float), "top_k": (int,), "seed": (int,)}


@dataclass
class BatchRequest:
    custom_id: str
    url: str
    model: str
    prompt_ids: list
    params: SamplingParams
    n: int


def read_batch(path: Path, limit: int | None = None) -> "list[tuple[str, str]]":
    """(file:line, text) of the first `limit` non-blank lines of a batch file ("-": stdin);
    they are parsed one by one later, so that a bad line is answered, not fatal."""
    if str(path) != STDIN and not Path(path).is_file():
        raise InputError(f"input file {path} does not exist")
    try:
        text = sys.stdin.read() if str(path) == STDIN else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    lines = [(f"{path}:{n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise InputError(f"{path} holds no requests")
    return lines[:limit] if limit is not None else lines


def run_batch(engine, lines, model: str, max_new_tokens: int, truncate: "str | None" = None,
              progress: bool = False) -> "list[dict]":
    """Output rows for (where, text) lines, in their order, in memory (answer_file journals them).
    max_new_tokens: for rows that set none."""
    parsed = requests_of(engine, lines, model, max_new_tokens, truncate)
    served = [r for r in parsed if isinstance(r, BatchRequest)]
    prompts = [r.prompt_ids for r in served]
    completions = iter(engine.generate(prompts, [engine_params(r) for r in served], progress=progress)
                       if prompts else ())
    created, token_text = int(time.time()), token_strings(engine.tokenizer)
    return [response_row(r, choices_of(next(completions)), created, token_text)
            if isinstance(r, BatchRequest) else r for r in parsed]


def requests_of(engine, lines, model: str, max_new_tokens: int, truncate) -> list:
    """Each line's engine request, or the error row that answers it."""
    return refuse_duplicate_ids(lines, [parse_line(engine, where, text, model, max_new_tokens, truncate)
                                        for where, text in lines])


def engine_params(request: BatchRequest) -> SamplingParams:
    """A row's n choices are SamplingParams(n) samples: forked from one prefill of its prompt (and
    distinct under one seed), not n copies of the request."""
    return replace(request.params, n=request.n)


def refuse_duplicate_ids(lines, parsed: list) -> list:
    """The Batch API requires each custom_id once (results are matched to requests by it): the
    first request with an id is served, every later one is answered with an error row."""
    first, out = {}, []
    for (where, _), row in zip(lines, parsed):
        custom_id = row.custom_id if isinstance(row, BatchRequest) else row.get("custom_id")
        if custom_id is not None and custom_id in first:
            row = error_row(custom_id, f"{where}: custom_id {custom_id!r} was already used at {first[custom_id]}; "
                                       "each request of a batch needs its own")
        elif custom_id is not None:
            first[custom_id] = where
        out.append(row)
    return out


def choices_of(completion) -> list:
    """A request's completions, one per choice (n = 1: itself)."""
    return completion.samples or [completion]


def parse_line(engine, where: str, text: str, model: str, max_new_tokens: int, truncate) -> "BatchRequest | dict":
    """The engine request of one line, or the error row that answers it."""
    custom_id = None
    try:
        row = json.loads(text)
        if not isinstance(row, dict):
            raise InputError("each line must be a JSON object")
        custom_id = row.get("custom_id")
        return parse_request(engine, row, model, max_new_tokens, truncate)
    except json.JSONDecodeError as e:
        return error_row(custom_id, f"{where}: not valid JSON ({e})")
    except MoegenError as e:
        return error_row(custom_id, f"{where}: {e}")


def parse_request(engine, row: dict, model: str, max_new_tokens: int, truncate) -> BatchRequest:
    custom_id, url, body = row.get("custom_id"), row.get("url"), row.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        raise InputError("'custom_id' must be a non-empty string")
    if row.get("method", "POST") != "POST":
        raise InputError(f"method must be POST, got {row.get('method')!r}")
    if url not in _FIELDS:
        raise InputError(f"url {url!r} is not served; use {CHAT} or {COMPLETIONS}")
    if not isinstance(body, dict):
        raise InputError("'body' must be a JSON object")
    check_fields(body, url)
    params = sampling_params(engine, body, max_new_tokens, requested_logprobs(body, url))
    check_logprob_counts(params, engine.model.vocab_size, f"request {custom_id!r}")
    n = 1 if body.get("n") is None else body["n"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"n must be an integer >= 1, got {n!r}")
    ids = engine.encode(prompt_of(engine, body, url), custom_id, params.max_new_tokens, truncate)
    return BatchRequest(custom_id, url, body.get("model") or model, ids, params, n)


def check_fields(body: dict, url: str) -> None:
    unknown = sorted(k for k in body if k not in _FIELDS[url] and not (k in _NO_OP and body[k] in _NO_OP[k]))
    if unknown:
        raise InputError(f"unsupported body field(s) {', '.join(unknown)} for {url}")
    for key, types in _NUMBERS.items():
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise InputError(f"{key} must be a number, got {value!r}")


def requested_logprobs(body: dict, url: str) -> "int | None":
    """The alternatives per generated token a row asks for (SamplingParams.logprobs), None for
    no log-probabilities."""
    if url == CHAT:
        wanted, top = body.get("logprobs"), body.get("top_logprobs")
        if wanted not in (None, True, False):
            raise InputError(f"logprobs must be true or false for {CHAT}, got {wanted!r}")
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 0):
            raise InputError(f"top_logprobs must be an integer >= 0, got {top!r}")
        if not wanted and top:
            raise InputError("top_logprobs needs logprobs: true")
        return (top or 0) if wanted else None
    k = body.get("logprobs")
    if k is None or k is False:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise InputError(f"logprobs must be an integer >= 0 for {COMPLETIONS}, got {k!r}")
    return k


def sampling_params(engine, body: dict, max_new_tokens: int, logprobs: "int | None" = None) -> SamplingParams:
    """Unset fields: the checkpoint's generation_config, else OpenAI's defaults."""
    limit = next((body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), max_new_tokens)
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise InputError(f"max_tokens must be an integer, got {limit!r}")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InputError("stop must be a string or a list of strings")
    given = {k: body[k] for k in ("temperature", "top_p", "top_k", "seed") if body.get(k) is not None}
    return SamplingParams(max_new_tokens=limit, stop=stop, logprobs=logprobs,
                          **{**OPENAI_SAMPLING, **engine.generation_defaults.sampling, **given})


def prompt_of(engine, body: dict, url: str):
    """Chat: the messages' prompt ids; completions: the prompt (text or token ids), as given."""
    if url == CHAT:
        if engine.tokenizer is None:
            raise InputError("chat completions need the checkpoint's tokenizer and chat template")
        return engine.tokenizer.apply_chat_template(body.get("messages"), "'messages'")
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and
                                   all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        return prompt
    raise InputError("'prompt' must be a string or a list of token ids (one prompt per request)")


# --- output rows ---------------------------------------------------------------------------------
def response_row(request: BatchRequest, completions, created: int, token_text) -> dict:
    """token_text: id -> the token's text (token_strings), for rows that ask for logprobs."""
    chat = request.url == CHAT
    k = request.params.logprobs
    choices = [{"index": j, "finish_reason": c.finish_reason, "logprobs": choice_logprobs(c, chat, k, token_text),
                **({"message": {"role": "assistant", "content": c.text}} if chat else {"text": c.text})}
               for j, c in enumerate(completions)]
    generated = sum(len(c.token_ids) for c in completions)
    prompt_tokens = len(request.prompt_ids)
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": request.model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                      "total_tokens": prompt_tokens + generated}}
    return _row(request.custom_id, 200, body, None)


def choice_logprobs(completion, chat: bool, k: "int | None", token_text) -> "dict | None":
    """A choice's `logprobs` object in OpenAI's shape for its url, None when not asked."""
    if completion.logprobs is None:
        return None
    if chat:
        return chat_logprobs(completion.token_ids, completion.logprobs, k, token_text)
    return completion_logprobs(completion.token_ids, completion.logprobs, token_text)


def chat_logprobs(token_ids, logprobs, k: int, token_text) -> dict:
    """{"content": [{token, logprob, bytes, top_logprobs: the k most likely}]}."""
    def entry(token_id, logprob):
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, found in zip(token_ids, logprobs):
        # found: the chosen token first, then the k most likely (the chosen one not repeated)
        top = sorted(found.items(), key=lambda item: -item[1])[:k]
        content.append({**entry(token_id, found[token_id]), "top_logprobs": [entry(t, lp) for t, lp in top]})
    return {"content": content}


def completion_logprobs(token_ids, logprobs, token_text) -> dict:
    """The legacy completions object: top_logprobs holds the chosen token and the k most likely
    (as OpenAI's: up to k + 1 entries); text_offset counts characters of the tokens' texts."""
    tokens = [token_text(t) for t in token_ids]
    top = []
    for found in logprobs:
        by_text = {}
        for token_id, logprob in found.items():
            by_text.setdefault(token_text(token_id), logprob)    # two ids may spell the same text
        top.append(by_text)
    return {"tokens": tokens, "token_logprobs": [found[t] for t, found in zip(token_ids, logprobs)],
            "top_logprobs": top, "text_offset": list(accumulate(map(len, tokens), initial=0))[:len(tokens)]}


def token_strings(tokenizer):
    """id -> a token's text as OpenAI's logprobs list it: its decoded text, a special token's
    own spelling ("</s>", which decode skips), "token_id:N" without a tokenizer; memoised."""
    @lru_cache(maxsize=None)
    def text(token_id: int) -> str:
        if tokenizer is None:
            return f"token_id:{token_id}"
        return tokenizer.decode([token_id]) or tokenizer.token_text(token_id)
    return text


def error_row(custom_id, message: str) -> dict:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return _row(custom_id if isinstance(custom_id, str) else None, 400, body,
                {"code": "invalid_request", "message": message})


def _row(custom_id, status: int, body: dict, error) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}, "error": error}


def answer_file(recipe, lines, out: str, model: str, max_new_tokens: int, truncate: "str | None" = None,
                progress=None, **job) -> dict:
    """Every line answered into `out` through the one generation job (moegen.generation.job):
    the lines are read here, once, without an engine (BatchReader); refused ones are answered at
    once, the others go to one engine call, or to `replicas` engines on Ray. Rows are journaled as
    they finish, each with its line's `index`, so a re-run of the same file answers only the lines
    the output lacks; at the end the output is in input order. A request's engine index is its
    place among all served requests of the file, so a seeded row draws the same tokens whether or
    not the run was resumed. job: GenerationJob's own settings (overwrite, wait, flush_rows,
    flush_seconds, replicas, ray_address, replica_threads). Returns the run's figures as a
    GenerationSummary (the fields `moegen generate` and the generate flow report), with the file's
    requests and failed rows."""
    from moegen.generation.job import GenerationJob, NoProgress
    reader = BatchReader.of(recipe)
    parsed = requests_of(reader, lines, model, max_new_tokens, truncate)
    served = [i for i, r in enumerate(parsed) if isinstance(r, BatchRequest)]
    position = {line: pos for pos, line in enumerate(served)}
    created, token_text = int(time.time()), token_strings(reader.tokenizer)

    def to_row(completion) -> dict:
        line = served[completion.index]
        return {**response_row(parsed[line], choices_of(completion), created, token_text), "index": line}
    asking = [isinstance(r, BatchRequest) for r in parsed]
    summary = GenerationJob(
        recipe, [r.prompt_ids if ask else None for r, ask in zip(parsed, asking)],
        [engine_params(r) if ask else None for r, ask in zip(parsed, asking)], out, truncate=truncate,
        answered={i: {**r, "index": i} for i, (r, ask) in enumerate(zip(parsed, asking)) if not ask},
        engine_index=[position.get(i) for i in range(len(parsed))], to_row=to_row,
        identity={"rows": [text for _, text in lines], "sampling": {"max_new_tokens": max_new_tokens},
                  "engine": {"format": "openai-batch"}}, **job).run(progress or NoProgress)
    summary.details["requests"] = len(lines)
    return summary.as_dict()


@dataclass
class BatchReader:
    """What reading a batch file's lines needs of an engine, made from its recipe without loading
    weights: the tokenizer (chat template, text prompts), the checkpoint's generation defaults, the
    model's config (as `model`: its vocab_size) and context length. Lines are read on the driver,
    so their token ids go to one engine or to Ray replicas alike."""
    tokenizer: object
    generation_defaults: object
    model: object
    max_model_len: int

    @classmethod
    def of(cls, recipe) -> "BatchReader":
        from moegen.loader import config_from
        from moegen.tokenizer import optional_tokenizer
        config = config_from(recipe.model)
        tokenizer = None if recipe.dummy_weights else optional_tokenizer(recipe.model)
        max_len = recipe.kwargs.get("max_model_len") or getattr(config, "max_position_embeddings", 1 << 20)
        return cls(tokenizer, recipe.generation_defaults(), config, max_len)

    def encode(self, prompt, index, max_new_tokens: int, truncate) -> list:
        return encode_prompt(prompt, index, max_new_tokens, truncate, self.tokenizer, self.model.vocab_size,
                             self.max_model_len)
