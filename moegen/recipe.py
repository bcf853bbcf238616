"""An Engine from user settings: the one place every caller builds one (`moegen generate` and its
OpenAI batch files, the `generate` flow, Ray replicas, the bench's moegen systems, the lm-eval
backend). A recipe is plain data, so it travels to Ray actors and is built where it runs."""
from __future__ import annotations

from dataclasses import dataclass, field

from moegen.engine.options import LOAD_OPTIONS, parse_options


@dataclass(frozen=True)
class EngineRecipe:
    """model: a checkpoint directory; with dummy_weights a config (object, dict, config.json or a
    bundled name) whose shapes get random weights. kwargs: Engine.from_pretrained / from_config
    keywords (dtype, device, host_memory, the engine options), already typed."""
    model: object
    dummy_weights: bool = False
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def from_settings(cls, model, settings: dict, dummy_weights: bool = False) -> EngineRecipe:
        """Settings by public name, as a user gives them (flags, flow parameters, model_args):
        load options (dtype, device, ...) as they are, engine options read from text and checked
        now (moegen.engine.options.parse_options), so an unknown name fails before a long load.
        None means unset: the engine's default."""
        load = {opt.name for opt in LOAD_OPTIONS}
        kwargs = {k: v for k, v in settings.items() if k in load and v is not None}
        kwargs.update(parse_options({k: v for k, v in settings.items() if k not in load}))
        return cls(model, dummy_weights, kwargs)

    def build(self):
        from moegen.engine import Engine
        if self.dummy_weights:
            return Engine.from_config(self.model, dummy_weights=True, **self.kwargs)
        return Engine.from_pretrained(self.model, **self.kwargs)

    def generation_defaults(self):
        """The checkpoint's generation_config.json defaults (moegen.engine.params.GenerationDefaults),
        for callers that set SamplingParams before any engine exists; none for dummy weights."""
        from moegen.engine.params import GenerationDefaults
        return GenerationDefaults() if self.dummy_weights else GenerationDefaults.read(self.model)

    @property
    def on_cuda(self) -> bool:
        return str(self.kwargs.get("device", "cpu")).startswith("cuda")
