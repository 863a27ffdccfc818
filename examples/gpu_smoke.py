# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Smoke test of PAL training on GPUs under the shipped accelerate configs: FSDP2 and DeepSpeed ZeRO-3 (and DDP), on a
tiny random Llama backbone built in code (nothing is downloaded). One command on a machine with GPUs:

```bash
python examples/gpu_smoke.py                      # every config, on all visible GPUs
python examples/gpu_smoke.py --configs fsdp2      # one of: multi_gpu, deepspeed_zero2, deepspeed_zero3, fsdp2
python examples/gpu_smoke.py --configs cpu_2proc  # a dry run without GPUs: DDP over gloo, 2 processes
```

For each config, `accelerate launch --config_file hub_configs/accelerate/<config>.yaml --num_processes <GPUs>` runs this
file in worker mode, which, on every process:

1. trains PAL-B with the backbone frozen (features encoded once, split across processes), saves, fits new users
   (`adapt_users`), evaluates and saves again;
2. the same with the backbone trained (tokens through the sharded backbone);

and checks that losses and accuracies are finite, that every process ends with the same user table and population
mixture, and that both saved models reload with `PalRewardModel.from_pretrained` with their user tables. It prints one
line per config and exits with an error if any failed. DeepSpeed configs are skipped when DeepSpeed is not installed.
FSDP and ZeRO-3 need GPUs (on the CPU, accelerate silently runs DDP instead); with one GPU they still run, on one shard.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

CONFIGS = ("multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp2")
CPU_CONFIG = "cpu_2proc"  # a dry run of this script without GPUs: DDP over gloo, 2 processes
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_backbone(folder: str):
    """A 2-layer random Llama and a word-level tokenizer over the demo data's words, saved to `folder`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    from pal_rm.data import load_demo_preferences

    dataset = load_demo_preferences(seed=0)
    splitter = pre_tokenizers.Whitespace()
    texts = [
        text for split in dataset.values() for column in ("prompt", "chosen", "rejected") for text in split[column]
    ]
    words = sorted({word for text in texts for word, _ in splitter.pre_tokenize_str(text)})
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[EOS]", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = splitter
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
    )
    LlamaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def worker(args) -> None:
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from transformers import AutoTokenizer

    from pal_rm import PalRewardModel
    from pal_rm.data import load_demo_preferences
    from pal_rm.trainers import PalRewardConfig, PalRewardTrainer

    on_cpu = not torch.cuda.is_available()  # a dry run of the worker on the CPU: DDP over gloo
    state = PartialState(cpu=on_cpu)
    backbone = os.path.join(args.folder, "backbone")
    if state.is_main_process:
        tiny_backbone(backbone)
    state.wait_for_everyone()
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    dataset = load_demo_preferences(
        users_per_group=2, num_mixture_users=0, pairs_per_user=29, num_unseen_users=4, unseen_shots=10, seed=1
    )
    report = {}
    for train_backbone in (False, True):
        name = "trained backbone" if train_backbone else "frozen backbone"
        model = PalRewardModel.from_backbone(
            backbone, variant="b", num_prototypes=3, preference_dim=16, pooling="mean"
        )
        output_dir = os.path.join(args.folder, name.replace(" ", "_"))
        config = PalRewardConfig(
            output_dir,
            num_train_epochs=3,
            per_device_train_batch_size=8,
            learning_rate=1e-2,
            train_backbone=train_backbone,
            disable_tqdm=True,
            report_to="none",
            seed=0,
            adapt_steps=50,
            use_cpu=on_cpu,
        )
        trainer = PalRewardTrainer(
            model,
            config,
            train_dataset=dataset["train"],
            eval_dataset=dataset["validation"],
            processing_class=tokenizer,
        )
        train_loss = trainer.train().training_loss
        seen = trainer.evaluate(dataset["test"], metric_key_prefix="test")["test_accuracy"]
        trainer.save_model(output_dir)
        with trainer.full_pal_parameters():  # whole even where ZeRO-3 partitions it
            trained_rows = trainer.pal_model.user_weights.weight.detach().float().cpu().clone()
        trainer.adapt_users(dataset["unseen_train"])
        unseen = trainer.evaluate(dataset["unseen_test"], metric_key_prefix="unseen")["unseen_accuracy"]
        trainer.save_model(output_dir + "-adapted")  # the grown user table, saved through the engine
        with trainer.full_pal_parameters():
            table = trainer.pal_model.user_weights.weight.detach().float().cpu()
            population = trainer.pal_model.population_mixture.detach().float().cpu()
        tables = gather_object([(table, population)])
        identical = all(torch.equal(t, tables[0][0]) and torch.equal(p, tables[0][1]) for t, p in tables)
        values = (train_loss, seen, unseen)
        report[name] = {
            "train_loss": train_loss,
            "seen_accuracy": seen,
            "unseen_accuracy": unseen,
            "finite": all(torch.isfinite(torch.tensor(v)).item() for v in values),
            "identical_user_tables": identical,
            # Reloaded by the launching process, outside the engine (under ZeRO-3, `from_pretrained` in a worker
            # would partition the model again).
            "saved": {output_dir: trained_rows.tolist(), output_dir + "-adapted": table.tolist()},
        }
        state.wait_for_everyone()
    if state.is_main_process:
        report["processes"] = state.num_processes
        report["distributed_type"] = str(state.distributed_type)
        with open(os.path.join(args.folder, "report.json"), "w") as file:
            json.dump(report, file, indent=2)


def reloads(saved: dict[str, list]) -> bool:
    """Whether every saved folder loads with `PalRewardModel.from_pretrained` with the user table it was saved with."""
    import torch

    from pal_rm import PalRewardModel

    for folder, table in saved.items():
        model = PalRewardModel.from_pretrained(folder)
        if not torch.allclose(model.user_weights.weight.float(), torch.tensor(table), atol=1e-3):
            return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=[*CONFIGS, CPU_CONFIG])
    parser.add_argument("--num_processes", type=int, default=None, help="Default: the number of visible GPUs.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import importlib.util

    import torch

    if not torch.cuda.is_available() and args.configs != [CPU_CONFIG]:
        print(
            f"No GPU visible: FSDP and DeepSpeed need GPUs. `--configs {CPU_CONFIG}` dry-runs this script on the CPU."
        )
        return 1
    num_processes = args.num_processes or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    failed = []
    for name in args.configs:
        if name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
            print(f"{name}: skipped (DeepSpeed is not installed: pip install deepspeed)")
            continue
        with tempfile.TemporaryDirectory() as folder:
            config = os.path.join(REPOSITORY, "hub_configs", "accelerate", f"{name}.yaml")
            command = [accelerate, "launch", "--config_file", config, f"--num_processes={num_processes}"]
            command += [os.path.abspath(__file__), "--worker", "--folder", folder]
            completed = subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY)
            report_path = os.path.join(folder, "report.json")
            if completed.returncode != 0 or not os.path.exists(report_path):
                failed.append(name)
                print(f"{name}: FAILED (exit code {completed.returncode})\n{completed.stderr[-4000:]}")
                continue
            with open(report_path) as file:
                report = json.load(file)
            for part in ("frozen backbone", "trained backbone"):
                report[part]["reloads"] = reloads(report[part]["saved"])
        for part in ("frozen backbone", "trained backbone"):
            result = report[part]
            ok = result["finite"] and result["identical_user_tables"] and result["reloads"]
            if not ok:
                failed.append(f"{name} ({part})")
            print(
                f"{name} ({report['distributed_type']}, {report['processes']} processes), {part}: "
                f"{'ok' if ok else 'FAILED'}: loss {result['train_loss']:.3f}, seen accuracy "
                f"{result['seen_accuracy']:.3f}, unseen accuracy {result['unseen_accuracy']:.3f}, identical user "
                f"tables {result['identical_user_tables']}, reloads {result['reloads']}"
            )
    if failed:
        print(f"Failed: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
