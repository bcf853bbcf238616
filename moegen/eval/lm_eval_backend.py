"""lm-eval backend: importing this module registers the lm-eval model `moegen`.

    lm_eval.simple_evaluate(model="moegen", model_args="pretrained=DIR,dtype=float32,max_batch=64", ...)

or from lm-eval's own command line: `moegen lm-eval --model moegen --model_args pretrained=DIR ...`
(moegen.eval.launcher).

Every request of a call goes to the engine at once (one `Engine.loglikelihood` or
`Engine.generate` call), so module batching sees the whole workload; results come back in the
order lm-eval gave them.

Conventions, chosen to agree with lm-eval's own `hf` backend on the same checkpoint:
- Contexts are encoded with BOS (as the tokenizer's own convention says: Llama/Mistral yes,
  Qwen no); an empty loglikelihood context is the single token `prefix_token_id` (BOS, else EOS).
- Too long inputs are cut from the left: loglikelihood keeps the last `max_length + 1` tokens
  of context + continuation, generation keeps the last `max_length - max_gen_toks` context tokens.
- `generate_until` is greedy unless the request says `do_sample: true`. A generated text is
  decoded as a whole text, as transformers does: with a SentencePiece tokenizer the space
  that starts the first generated word is dropped ("Answer:" -> "18", not " 18"). It is then
  cut at the first of the request's `until` strings or the EOS token's text.
- `loglikelihood_rolling` encodes the text *without* BOS and scores every text token exactly
  once in windows of `max_length` tokens; the first window is conditioned on BOS
  (`prefix_token_id`), later ones on the preceding text. (lm-eval's `hf` backend also encodes
  the text with BOS, and so additionally scores BOS itself after the BOS prefix; we don't.)
- `--apply_chat_template` renders with the checkpoint's chat template (moegen.tokenizer); as in
  the hf backend, special-token text in a context ("<s>", "</s>") is that token, and a context
  that already starts with BOS's text gets no second BOS.
- Every result goes to lm-eval's cache hook as soon as it exists (generations as each sequence
  finishes), so `--use_cache` resumes an interrupted run with what it had finished.
- lm-eval keys its cache by the request alone. So that another model's answers are never served,
  a cache the moegen model is given is marked with what decides its answers (the checkpoint's
  fingerprint, dtype, max_length); a cache marked for another model, or holding answers no mark
  vouches for, is refused naming the difference (`moegen lm-eval` also gives each model a cache
  file of its own: moegen.eval.launcher).
"""
import json
import logging

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from moegen.dtypes import dtype_name
from moegen.engine.config import DTYPE
from moegen.engine.options import engine_option_names, unknown_engine_options
from moegen.errors import ConfigError, InputError
from moegen.recipe import EngineRecipe

log = logging.getLogger("moegen")
DEFAULT_MAX_GEN_TOKS = 256
# gen_kwargs keys lm-eval tasks use for the generation length, in lm-eval's priority order
_LENGTH_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
_SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "seed")


@register_model("moegen")
class MoegenLM(TemplateLM):
    """lm-eval model over a moegen Engine. model_args: `pretrained` (checkpoint dir), `dtype`,
    `device`, `max_length` (context used for truncation and rolling windows; default the
    model's), and any engine option (moegen.engine.options: max_batch, attn_micro_batch,
    host_memory, ...). `engine=` takes an already loaded Engine instead."""

    def __init__(self, pretrained=None, dtype=DTYPE.default, device="cpu", max_length=None, engine=None,
                 batch_size=None, max_batch_size=None, **engine_options):
        super().__init__()
        # batch_size / max_batch_size come from lm-eval's CLI; the engine batches everything it
        # is given (max_batch bounds a step), so they are accepted and ignored.
        del batch_size, max_batch_size
        if engine is None:
            engine = model_args_recipe(pretrained, dtype, device, engine_options).build()
        self.engine = engine
        self.tokenizer = self.engine.tokenizer
        if self.tokenizer is None:
            raise ConfigError("the moegen lm-eval backend needs an engine with a tokenizer")
        self.pretrained = str(pretrained) if pretrained is not None else None
        self._max_length = self._check_max_length(max_length)

    def _check_max_length(self, max_length) -> int:
        limit = self.engine.max_model_len
        if max_length is None:
            return limit
        max_length = int(max_length)
        if not 1 <= max_length <= limit:
            raise ConfigError(f"max_length={max_length} must be in [1, {limit}] (the model's context)")
        return max_length

    # --- lm-eval's answer cache (--use_cache) -------------------------------------------------------
    def set_cache_hook(self, cache_hook) -> None:
        """lm-eval's CachingLM hands its database here: claim it for this model (module doc)."""
        db = getattr(cache_hook, "dbdict", None)
        if db is not None:
            claim_cache(db, self.answers_identity())
        super().set_cache_hook(cache_hook)

    def answers_identity(self) -> dict:
        """What decides this model's answers, besides the request itself."""
        from moegen.checkpoints.fingerprints import checkpoint_fingerprint
        model_dir = self.pretrained or getattr(self.tokenizer, "model_dir", None)
        return {"checkpoint_sha256": checkpoint_fingerprint(model_dir) if model_dir else None,
                "dtype": dtype_name(self.engine.model.dtype), "max_length": self.max_length,
                "max_gen_toks": self.max_gen_toks}

    # --- what TemplateLM needs ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    @property
    def tokenizer_name(self) -> str:
        """Names the request cache with --apply_chat_template: a file name, so no "/" (as hf)."""
        return (self.pretrained or "moegen").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> "list[int]":
        # None means "the tokenizer's default": BOS where the tokenizer uses one, unless the text
        # already starts with it (a rendered chat prompt)
        add_bos = add_special_tokens is True or (add_special_tokens is None and not self._starts_with_bos(string))
        return self.tokenizer.encode(string, add_bos=add_bos, parse_special=True)

    def _starts_with_bos(self, string: str) -> bool:
        bos = self.tokenizer.bos_token_id
        return bos is not None and string.startswith(self.tokenizer.token_text(bos))

    # --- chat templates (--apply_chat_template) -----------------------------------------------------
    def chat_template(self, chat_template=False) -> "str | None":
        """The template lm-eval records: the checkpoint's; True asks for it, a name for a named one."""
        if not chat_template:
            return None
        if isinstance(chat_template, str) and chat_template != "default":
            raise ConfigError(f"--apply_chat_template {chat_template}: moegen uses the checkpoint's default "
                              "chat template; named templates are not supported")
        if self.tokenizer.chat_template is None:
            raise ConfigError(f"{self.pretrained or 'this checkpoint'} has no chat template (chat_template.jinja, "
                              "or chat_template in tokenizer_config.json): run without --apply_chat_template")
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        """lm-eval's chat history as the template's text; without a generation prompt the last
        (assistant) message is left open to be continued, as the hf backend does."""
        try:
            return self._render(chat_history, add_generation_prompt)
        except InputError:
            # as the hf backend does: templates that refuse a system role get the history without it
            if not any(m.get("role") == "system" for m in chat_history):
                raise
            log.warning("the chat template refused the conversation; retrying without its system message")
            return self._render([m for m in chat_history if m.get("role") != "system"], add_generation_prompt)

    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                          continue_final_message=not add_generation_prompt, where="lm-eval chat history")

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens))

    def get_model_info(self) -> dict:
        model = self.engine.model
        return {"model_num_parameters": model.num_parameters(),
                "model_dtype": dtype_name(model.dtype), "model_backend": "moegen"}

    # --- scoring --------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> "list[tuple[float, bool]]":
        """requests: ((context, continuation) strings or None, context ids, continuation ids)."""
        pairs = [self._fit_pair(ctx, cont, i) for i, (_, ctx, cont) in enumerate(requests)]
        results = self.engine.loglikelihood(pairs, progress=not disable_tqdm)
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def _fit_pair(self, ctx, cont, index: int):
        """Keep the last max_length + 1 tokens of context + continuation (the last token is only
        predicted, never fed), as the hf backend does."""
        ctx, cont = list(ctx), list(cont)
        if not cont:
            raise InputError(f"loglikelihood request {index}: the continuation encodes to no tokens")
        if len(cont) > self.max_length:
            raise InputError(f"loglikelihood request {index}: continuation of {len(cont)} tokens is longer "
                             f"than max_length={self.max_length}")
        keep = self.max_length + 1 - len(cont)
        return ctx[-keep:], cont

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> "list[float]":
        """Sum of log p over every token of each text (see the module docstring for BOS)."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in self.rolling_windows(self.tok_encode(text, add_special_tokens=False)):
                windows.append((ctx, cont))
                owner.append(i)
        scores = self.engine.loglikelihood(windows, progress=not disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def rolling_windows(self, tokens: "list[int]") -> "list[tuple[list[int], list[int]]]":
        """(context, continuation) pairs that predict each token once, at most max_length fed."""
        return [make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)]

    # --- generation -----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> "list[str]":
        from moegen.engine import SamplingParams

        prompts, params, untils = [], [], []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            until, max_gen, sampling = self._gen_options(gen_kwargs, i)
            prompts.append(self._fit_context(context, max_gen, i))
            # The engine matches stops in text that keeps the first word's leading space, which the
            # returned text drops (module doc); a stop starting with a space could match there
            # only, so those are left to the cut below.
            engine_stops = [s for s in until if not s.startswith(" ")]
            params.append(SamplingParams(max_new_tokens=max_gen, stop=engine_stops, **sampling))
            untils.append(until)
        texts = [None] * len(requests)
        # finish order: each text reaches the cache the moment it exists, so an interrupted run loses
        # only the unfinished ones
        for out in self.engine.generate_iter(prompts, params, progress=not disable_tqdm) if prompts else ():
            texts[out.index] = cut_at_stops(self.decode_generated(out.token_ids), untils[out.index])
            self.cache_hook.add_partial("generate_until", requests[out.index].args, texts[out.index])
        return texts

    def _gen_options(self, gen_kwargs, index: int):
        """(stop strings, max new tokens, SamplingParams sampling fields) of one request."""
        if not isinstance(gen_kwargs, dict):
            raise InputError(f"generate_until request {index}: gen_kwargs must be a dict, got {type(gen_kwargs).__name__}")
        unknown = sorted(set(gen_kwargs) - {"until", *_LENGTH_KEYS, *_SAMPLING_KEYS})
        if unknown:
            raise InputError(f"generate_until request {index}: unsupported generation options {unknown}; "
                             f"moegen supports until, {', '.join(_LENGTH_KEYS + _SAMPLING_KEYS)}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        eos = self._eos_text()
        if eos and eos not in until:
            until.append(eos)  # as lm-eval's backends do: the model may spell EOS out in pieces
        max_gen = next((int(gen_kwargs[k]) for k in _LENGTH_KEYS if gen_kwargs.get(k) is not None), self.max_gen_toks)
        return [s for s in until if s], max_gen, _sampling(gen_kwargs)

    def _fit_context(self, context: str, max_gen: int, index: int) -> "list[int]":
        room = self.max_length - max_gen
        if room < 1:
            raise InputError(f"generate_until request {index}: max_gen_toks={max_gen} leaves no room for "
                             f"a prompt in max_length={self.max_length}")
        ids = self.tok_encode(context)
        return ids[-room:]

    def decode_generated(self, ids: "list[int]") -> str:
        """Generated ids as transformers decodes them: a whole text, so a SentencePiece
        tokenizer drops the first word's space (moegen's decode of ids that start with BOS)."""
        from moegen.tokenizer import SentencePieceTokenizer
        bos = self.tokenizer.bos_token_id
        if isinstance(self.tokenizer, SentencePieceTokenizer) and bos is not None:
            ids = [bos, *ids]
        return self.tokenizer.decode(list(ids))

    def _eos_text(self) -> "str | None":
        """The EOS token's own text ("</s>"); decode() skips special tokens, so ask the model."""
        eos = self.tokenizer.eos_token_id
        if eos is None:
            return None
        return self.tokenizer.token_text(eos)


CACHE_MARK = "moegen:answers-of"          # never an lm-eval key (those are sha256 hex digests)


def claim_cache(db, identity: dict) -> None:
    """Mark an empty lm-eval cache with the model's identity; refuse one marked for another model
    or holding unmarked answers (another backend's or an older moegen's)."""
    mark = db.get(CACHE_MARK)
    where = getattr(db, "filename", "the lm-eval cache")
    if mark is None:
        if len(db):
            raise ConfigError(f"{where} holds answers that no moegen model vouches for (another backend's, or "
                              "written before caches were marked): use another --use_cache path")
        db[CACHE_MARK] = json.dumps(identity, sort_keys=True)
        return
    saved = json.loads(mark)
    if saved != identity:
        diffs = [f"{k}: {str(saved.get(k))[:16]} there, {str(identity.get(k))[:16]} here"
                 for k in sorted(set(saved) | set(identity)) if saved.get(k) != identity.get(k)]
        raise ConfigError(f"{where} holds the answers of another model ({'; '.join(diffs)}): use another "
                          "--use_cache path")


def cut_at_stops(text: str, stops: "list[str]") -> str:
    """Text up to the earliest occurrence of any stop string."""
    cut = min((text.find(s) for s in stops if s and s in text), default=len(text))
    return text[:cut]


def _sampling(gen_kwargs: dict) -> dict:
    """lm-eval's convention: greedy unless do_sample is true; sampling defaults to temperature 1."""
    if not gen_kwargs.get("do_sample", False):
        return {"temperature": 0.0}
    out = {"temperature": float(gen_kwargs.get("temperature", 1.0))}
    if gen_kwargs.get("top_p") is not None:
        out["top_p"] = float(gen_kwargs["top_p"])
    if gen_kwargs.get("top_k") is not None:
        out["top_k"] = int(gen_kwargs["top_k"])
    if gen_kwargs.get("seed") is not None:
        out["seed"] = int(gen_kwargs["seed"])
    return out


def model_args_recipe(pretrained, dtype, device, options: dict) -> EngineRecipe:
    """The EngineRecipe that lm-eval's model_args ask for, checked here once: pretrained given,
    every other name an engine option (read from text by EngineRecipe.from_settings)."""
    if pretrained is None:
        raise ConfigError("model_args needs pretrained=DIR (a checkpoint directory)")
    unknown = unknown_engine_options(options)
    if unknown:
        raise ConfigError(f"unknown moegen model_args {unknown}; known: pretrained, dtype, device, "
                          f"max_length, {', '.join(sorted(engine_option_names()))}")
    return EngineRecipe.from_settings(str(pretrained), {**options, "device": str(device), "dtype": str(dtype)})
