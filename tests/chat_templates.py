"""Chat templates the tests give tiny checkpoints (written once: chat, lm-eval and batch-file tests)."""
import json
import shutil

# Mistral's template writes BOS itself (so the tokenizer must not add one more) and EOS after
# each answer (special-token text that must become the token, not its spelling)
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")


def with_template(src, dst, template, as_file=False, drop=()):
    """A copy of checkpoint `src` whose tokenizer carries `template` (tokenizer_config.json, or a
    chat_template.jinja file), without the files in `drop`."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    if as_file:
        (dst / "chat_template.jinja").write_text(template)
    else:
        config = json.loads((dst / "tokenizer_config.json").read_text())
        (dst / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return dst
