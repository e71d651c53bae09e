"""Write the demo tasks of two tenants and a run config for each, deterministically.

    python examples/demo/make_demo.py            # rewrites the files beside this script

- support.jsonl   (tenant acme):   support message -> {"category": ..., "priority": ...}
- sentiment.jsonl (tenant globex): product review -> positive | negative | mixed
- support.yaml, sentiment.yaml:    LoRA run configs on the offline demo base
                                   (build it first: adapterdeck base build --out out/demo/base)

The generator is adapterdeck.core.demo; the same seed always gives the same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from adapterdeck.core.demo import TASKS, demo_config, write_demo_dataset

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for task, spec in TASKS.items():
        data = write_demo_dataset(args.out / f"{task}.jsonl", task=task, seed=args.seed)
        # Paths in a run config are relative to the config file; the base is built by `make demo`.
        base, output = Path("../../out/demo/base"), Path(f"../../out/runs/{task}")
        config = demo_config(base, Path(data.name), output, args.seed, task)
        header = f"# {spec.tenant}/{task}: adapterdeck train examples/demo/{task}.yaml\n"
        (args.out / f"{task}.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
        print(f"wrote {data} and {task}.yaml")


if __name__ == "__main__":
    main()
