"""Write the embedded base model (SmolLM2-135M-Instruct) as an HF folder, once."""

from __future__ import annotations

import sys
import time

from longtail.serving.base_models import (
    BaseModelError,
    embedded_model_dir,
    ensure_embedded_model,
    is_model_dir,
)


def main() -> int:
    target = embedded_model_dir()
    if is_model_dir(target) and (target / "tokenizer.json").is_file():
        return 0
    print(f"== converting the embedded base model into {target} (once, about 30 s)")
    started = time.perf_counter()
    try:
        ensure_embedded_model()
    except BaseModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"== base model ready in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
