"""lm-evaluation-harness 0.4.13's own CLI with our backend registered (``--model llmcourse``).

lm-eval finds a model name only in its registry, filled by its own ``MODEL_MAPPING`` and by classes imported
in the process (``@register_model``); this entry point imports :mod:`llmcourse.evaluation.lm_eval_backend`
and then hands the command line, unchanged, to ``lm_eval.__main__.cli_evaluate``::

    python -m llmcourse.evaluation.lm_eval_cli run --model llmcourse --model_args model=out/int8 \\
        --tasks piqa --limit 50
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import llmcourse.evaluation.lm_eval_backend  # noqa: F401  (registers "llmcourse")

    cli_evaluate()


if __name__ == "__main__":
    main()
