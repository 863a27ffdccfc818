# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Speed benchmark on the persona data (standard setting) with the packaged all-MiniLM-L6-v2 backbone frozen.

1. Training PAL-B (K = 4) for the same epochs, (a) with the embedding cache (`PalRewardTrainer`, frozen backbone: each
   unique text is encoded once) and (b) with the naive loop of the original PAL code, which runs the backbone on every
   text of every batch of every epoch. Wall time, peak RSS and test accuracy of each; the time ratio.
2. Fitting 1,000 new users with 20 comparisons each (`adapt_users`): the encoding of their new texts and the fit.
3. Reward-scoring throughput of `PalRewardModel` (PAL-A, and PAL-B which also encodes the prompt) against the bare
   backbone forward on the same batches, measured alternately in one process; the ratio.
4. Peak RSS with 1,000,000 registered users, and the time to register them and to look one up.
5. A million users (`many_users`): `PalRewardTrainer` on 1,000,000 users x 1,000,000 comparisons of random pooled
   features (a backbone-free `PalConfig(feature_dim=...)`), against a 100-user table on as many comparisons: trainer
   set-up time, the median time of a training step (the trainers take turns, so load on the machine hits both alike),
   the same with dense user-table updates (`user_table_update="dense"`), and a per-user evaluation of the million users.

Every part runs in its own subprocess, so peak memory figures do not mix.

```bash
python examples/benchmarks/speed.py            # ~25 minutes on 2 cores
python examples/benchmarks/speed.py --parts many_users   # one part; updates that part of an existing speed.json
python examples/benchmarks/speed.py --smoke --data_dir tests/fixtures/persona
```

Writes `outputs/benchmarks/speed.json` and `outputs/benchmarks/speed.png`.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from _common import OUTPUT_DIR, PERSONA_DATA_DIR, machine, markdown_table, write_json
from tqdm.auto import tqdm
from transformers import (
    AutoModel,
    AutoTokenizer,
    TrainerCallback,
    get_linear_schedule_with_warmup,
    set_seed,
)

from pal_rm import PalConfig, PalRewardModel
from pal_rm.data import available_personas, load_persona_preferences
from pal_rm.metrics import personalized_preference_metrics
from pal_rm.modeling_pal import format_preference_texts
from pal_rm.trainers import PalRewardConfig, PalRewardTrainer
from pal_rm.utils import MINILM, resolve_model_path

PARTS = ("cached", "naive", "adapt", "scoring", "users", "many_users")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mb() -> float:
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) for line in file if line.startswith("VmRSS")) / 1024


def load_data(args, **overrides):
    kwargs = {"num_groups": 4, "users_per_group": 10, "pairs_per_user": 50, "num_unseen_users": 0, "seed": args.seed}
    if args.smoke:
        kwargs.update(num_groups=2, users_per_group=3, pairs_per_user=10)
        kwargs["personas"] = available_personas(args.data_dir)
    return load_persona_preferences(args.data_dir, **{**kwargs, **overrides})


def new_model(args):
    set_seed(args.seed)
    return PalRewardModel.from_backbone(resolve_model_path(MINILM), variant="b", num_prototypes=4, preference_dim=64)


def test_accuracy(model, tokenizer, split) -> float:
    """The same evaluation for both training loops: chosen above rejected for the row's user."""
    model.eval()
    with torch.inference_mode():
        chosen = model.score_texts(tokenizer, split["prompt"], split["chosen"], users=split["user_id"], batch_size=128)
        rejected = model.score_texts(
            tokenizer, split["prompt"], split["rejected"], users=split["user_id"], batch_size=128
        )
    return personalized_preference_metrics((chosen - rejected).numpy())["accuracy"]


def training_config(args, output_dir) -> PalRewardConfig:
    return PalRewardConfig(
        output_dir=output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=64,
        learning_rate=1e-3,
        seed=args.seed,
        use_cpu=True,
        logging_steps=1000,
        disable_tqdm=False,
    )


def part_cached(args, tokenizer) -> dict:
    dataset = load_data(args)
    model = new_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        trainer = PalRewardTrainer(
            model, training_config(args, tmp), train_dataset=dataset["train"], processing_class=tokenizer
        )
        encoded = time.perf_counter() - start
        trainer.train()
        seconds = time.perf_counter() - start
        result = {"seconds": seconds, "encode_seconds": encoded, "peak_rss_mb": peak_rss_mb()}
        result["texts_encoded"] = trainer.embedding_cache.num_encoded
        result["test_accuracy"] = test_accuracy(model, tokenizer, dataset["test"])

    return result


def part_adapt(args, tokenizer) -> dict:
    """
    Fitting 1,000 new users with 20 comparisons each, all at once, after training with a validation split (so the
    adaptation prior is learned): with the learned prior, and with each of the two priors forced, side by side.
    """
    dataset = load_data(args)
    model = new_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = PalRewardTrainer(
            model,
            training_config(args, tmp),
            train_dataset=dataset["train"],
            eval_dataset=dataset["validation"],
            processing_class=tokenizer,
        )
        trainer.train()
        learned = model.config.adaptation_prior
        if learned is None:  # too few validation comparisons per user (the smoke run): the default Gaussian
            mean, std = model.population_prior_statistics(model.trained_user_rows())
            learned = {"method": "gaussian", "mean": mean.tolist(), "std": std.tolist(), "strength": 1.0}
        learned = dict(learned)
        # 1,000 new users with 20 comparisons each (texts from the statement pool of training).
        new_users = load_data(args, num_unseen_users=args.new_users, unseen_shots=20, unseen_test_pairs=0)[
            "unseen_train"
        ]
        start = time.perf_counter()
        texts = [
            text
            for p, c, r in zip(new_users["prompt"], new_users["chosen"], new_users["rejected"])
            for text in (*format_preference_texts(tokenizer, p, c), format_preference_texts(tokenizer, p, r)[1])
        ]
        # Their new texts, into the trainer's store (training set the backbone's EOS id, so its fingerprint is pinned),
        # so that the fits below are timed alone.
        trainer.embedding_cache.encode(model, tokenizer, texts, fingerprint=trainer.embedding_cache.fingerprint)
        result = {
            "users": len(set(new_users["user_id"])),
            "comparisons": len(new_users),
            "encode_new_texts_seconds": time.perf_counter() - start,
            "learned_prior": {k: v for k, v in learned.items() if k != "selection"},
            "fits": {},
        }
        users_before = model.num_users
        for name, prior in (
            ("learned", learned),
            ("empirical", {**learned, "method": "empirical", "bandwidth": 0.1}),
            ("gaussian", {**learned, "method": "gaussian", "strength": 1.0}),
        ):
            model.config.adaptation_prior = prior
            start = time.perf_counter()
            adapted = trainer.adapt_users(new_users)
            result["fits"][name] = {
                "method": prior["method"],
                "seconds": time.perf_counter() - start,
                "train_accuracy": adapted["accuracy"],
            }
            model.truncate_users(users_before)
        model.config.adaptation_prior = learned
        result["fit_seconds"] = max(fit["seconds"] for fit in result["fits"].values())
    return result


def part_naive(args, tokenizer) -> dict:
    """The original code's loop: the frozen backbone runs on every text of every batch, every epoch."""
    dataset = load_data(args)
    train = dataset["train"]
    model = new_model(args)
    model.backbone.requires_grad_(False)
    model.add_users(list(dict.fromkeys(train["user_id"])))
    config = training_config(args, "unused")
    groups = {"user_weights.": config.user_learning_rate, "prototypes": config.prototype_learning_rate}
    parameters = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            lr = next((rate for prefix, rate in groups.items() if name.startswith(prefix)), config.learning_rate)
            parameters.append({"params": [parameter], "lr": lr})
    optimizer = torch.optim.AdamW(parameters, weight_decay=0.0)
    batch_size = config.per_device_train_batch_size
    steps = int(args.epochs) * ((len(train) + batch_size - 1) // batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps)
    texts = [
        (*format_preference_texts(tokenizer, p, c), format_preference_texts(tokenizer, p, r)[1])
        for p, c, r in zip(train["prompt"], train["chosen"], train["rejected"])
    ]
    users = list(train["user_id"])

    def encode(batch_texts):
        encoded = tokenizer(batch_texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
        with torch.no_grad():
            return model.encode(encoded["input_ids"], encoded["attention_mask"], encoded.get("token_type_ids"))

    start = time.perf_counter()
    model.train()
    generator = torch.Generator().manual_seed(args.seed)
    progress = tqdm(total=steps, desc="Naive loop (re-encoding every batch)")
    for _ in range(int(args.epochs)):
        for batch in torch.randperm(len(train), generator=generator).split(batch_size):
            batch = batch.tolist()
            prompts = encode([texts[i][0] for i in batch])
            chosen = encode([texts[i][1] for i in batch])
            rejected = encode([texts[i][2] for i in batch])
            user_ids = [users[i] for i in batch]
            difference = (
                model(item_features=chosen, prompt_features=prompts, user_ids=user_ids).logits
                - model(item_features=rejected, prompt_features=prompts, user_ids=user_ids).logits
            )
            loss = -torch.nn.functional.logsigmoid(difference).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            progress.update()
    progress.close()
    seconds = time.perf_counter() - start
    model.refresh_population_mixture()
    return {
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "texts_encoded": 3 * len(train) * int(args.epochs),
        "test_accuracy": test_accuracy(model, tokenizer, dataset["test"]),
    }


def part_scoring(args, tokenizer) -> dict:
    dataset = load_data(args)
    split = dataset["test"]
    batch = min(args.scoring_batch, len(split))
    items = [
        format_preference_texts(tokenizer, p, c)[1] for p, c in zip(split["prompt"][:batch], split["chosen"][:batch])
    ]
    prompts = list(split["prompt"][:batch])
    encoded = tokenizer(items, padding=True, truncation=True, max_length=512, return_tensors="pt")
    encoded_prompts = tokenizer(prompts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    backbone = AutoModel.from_pretrained(resolve_model_path(MINILM)).eval()
    pal_a = PalRewardModel.from_backbone(resolve_model_path(MINILM), variant="a", num_prototypes=4).eval()
    pal_b = PalRewardModel.from_backbone(resolve_model_path(MINILM), variant="b", num_prototypes=4).eval()
    runs = {
        "backbone": lambda: backbone(**encoded),
        "pal_a": lambda: pal_a(**encoded),
        "pal_b": lambda: pal_b(
            **encoded,
            prompt_input_ids=encoded_prompts["input_ids"],
            prompt_attention_mask=encoded_prompts["attention_mask"],
            prompt_token_type_ids=encoded_prompts["token_type_ids"],
        ),
        "backbone_items_and_prompts": lambda: (backbone(**encoded), backbone(**encoded_prompts)),
    }
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run()  # warm-up
        for _ in tqdm(range(args.scoring_rounds), desc="Scoring rounds"):
            for name, run in runs.items():  # alternate, so machine noise hits every variant alike
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "batch_size": batch,
        "sequence_length": encoded["input_ids"].shape[1],
        "prompt_length": encoded_prompts["input_ids"].shape[1],
        "median_seconds": median,
        "sequences_per_second": {name: batch / value for name, value in median.items()},
        "pal_a_over_backbone": median["pal_a"] / median["backbone"],
        "pal_b_over_backbone_items_and_prompts": median["pal_b"] / median["backbone_items_and_prompts"],
        "pal_b_over_backbone": median["pal_b"] / median["backbone"],
    }


def part_users(args, tokenizer) -> dict:
    model = new_model(args).eval()
    before = current_rss_mb()
    ids = [f"user-{index:07d}" for index in range(args.registered_users)]
    start = time.perf_counter()
    model.add_users(ids)
    register = time.perf_counter() - start
    after = current_rss_mb()
    start = time.perf_counter()
    rows = model.user_rows([ids[-1], ids[len(ids) // 2]])
    lookup = time.perf_counter() - start
    with torch.inference_mode():
        start = time.perf_counter()
        reward = model.score_texts(tokenizer, ["Is this a statement?"], [" Yes"], users=[ids[-1]])
        score = time.perf_counter() - start
    return {
        "registered_users": model.num_users,
        "rss_before_mb": before,
        "rss_after_mb": after,
        "peak_rss_mb": peak_rss_mb(),
        "register_seconds": register,
        "lookup_seconds": lookup,
        "score_one_seconds": score,
        "rows_found": rows.tolist(),
        "reward_is_finite": bool(torch.isfinite(reward).all()),
    }


class StepTimer(TrainerCallback):
    """Wall time between consecutive optimizer steps (everything a step does: data, forward, backward, update)."""

    def __init__(self):
        self.durations: list[float] = []
        self._last: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = None

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._last is not None:
            self.durations.append(now - self._last)
        self._last = now


def random_feature_preferences(num_users: int, num_comparisons: int, feature_dim: int, seed: int):
    """Random pooled features for PAL-B; user `i % num_users` (shuffled) makes comparison i."""
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    users = np.arange(num_comparisons) % num_users
    rng.shuffle(users)
    width = len(str(num_users))
    columns = {"user_id": [f"user-{user:0{width}d}" for user in users]}
    for name in ("prompt_features", "chosen_features", "rejected_features"):
        columns[name] = rng.standard_normal((num_comparisons, feature_dim), dtype=np.float32)
    return Dataset.from_dict(columns)


def part_many_users(args, tokenizer) -> dict:
    """Set-up, step time and per-user evaluation with a million users (random features, no backbone)."""
    from pal_rm.trainers import PalRewardConfig, PalRewardTrainer

    # One thread: the steps are small tensor operations, where a second thread adds synchronisation and exposes the
    # figures to the load of other processes.
    torch.set_num_threads(1)
    feature_dim = 16
    tables = {"few_users": (args.few_users, "auto"), "many_users": (args.many_users, "auto")}
    tables["many_users_dense"] = (args.many_users, "dense")
    datasets, trainers, timers = {}, {}, {}
    result = {"comparisons": args.many_users_comparisons, "feature_dim": feature_dim, "torch_threads": 1}
    for name, (num_users, update) in tables.items():
        if num_users not in datasets:
            start = time.perf_counter()
            datasets[num_users] = random_feature_preferences(
                num_users, args.many_users_comparisons, feature_dim, args.seed
            )
            result[f"dataset_{num_users}_users_seconds"] = time.perf_counter() - start
        set_seed(args.seed)
        model = PalRewardModel(PalConfig(feature_dim=feature_dim, variant="b", num_prototypes=4, preference_dim=16))
        config = PalRewardConfig(
            output_dir=os.path.join(tempfile.gettempdir(), f"pal-speed-{name}"),
            max_steps=args.many_users_steps,
            per_device_train_batch_size=64,
            per_device_eval_batch_size=8192,
            lr_scheduler_type="constant",
            logging_steps=50,
            use_cpu=True,
            disable_tqdm=True,
            user_table_update=update,
            seed=args.seed,
        )
        start = time.perf_counter()
        trainers[name] = PalRewardTrainer(model, config, train_dataset=datasets[num_users])
        result[name] = {
            "users": model.num_users,
            "user_table_update": update,
            "setup_seconds": time.perf_counter() - start,
        }
        timers[name] = StepTimer()
        trainers[name].add_callback(timers[name])
        trainers[name].remove_callback(__import__("transformers").PrinterCallback)
    for _ in range(args.many_users_rounds):  # the trainers take turns
        for trainer in trainers.values():
            trainer.train()
    for name, timer in timers.items():
        # Per-batch updates keep their Adam state under these keys of the optimizer state of the table.
        table = trainers[name].model.user_weights.weight
        result[name]["sparse"] = "user_rows_step" in trainers[name].optimizer.state[table]
        result[name]["step_seconds_median"] = statistics.median(timer.durations)
        result[name]["steps_timed"] = len(timer.durations)
    many, few = result["many_users"], result["few_users"]
    result["step_ratio_many_over_few"] = many["step_seconds_median"] / few["step_seconds_median"]
    result["step_ratio_dense_over_few"] = (
        result["many_users_dense"]["step_seconds_median"] / few["step_seconds_median"]
    )

    trainer = trainers["many_users"]
    start = time.perf_counter()
    metrics = trainer.evaluate(trainer.train_dataset)  # already processed: the forward passes and per-user accuracy
    many["evaluate_seconds"] = time.perf_counter() - start
    many["evaluated_users"] = len(trainer.per_user_accuracy["eval"])
    many["evaluate_accuracy"] = metrics["eval_accuracy"]
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def run_part(part: str, args) -> dict:
    """Runs one part in a fresh interpreter and returns its figures."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        path = handle.name
    command = [sys.executable, os.path.abspath(__file__), "--part", part, "--part_output", path] + args.forward
    subprocess.run(command, check=True)
    with open(path) as file:
        result = json.load(file)
    os.remove(path)
    return result


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    training = {"embedding cache": results["cached"]["seconds"], "naive loop": results["naive"]["seconds"]}
    axes[0].barh(list(training), list(training.values()), color=["tab:green", "tab:red"])
    axes[0].set(title=f"PAL-B training, {results['config']['epochs']:g} epochs", xlabel="seconds")
    throughput = results["scoring"]["sequences_per_second"]
    axes[1].barh(list(throughput), list(throughput.values()))
    axes[1].set(title="reward scoring throughput", xlabel="sequences / second")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=PERSONA_DATA_DIR)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--new_users", type=int, default=1000)
    parser.add_argument("--registered_users", type=int, default=1_000_000)
    parser.add_argument("--scoring_batch", type=int, default=64)
    parser.add_argument("--scoring_rounds", type=int, default=20)
    parser.add_argument("--few_users", type=int, default=100, help="many_users: the small table.")
    parser.add_argument("--many_users", type=int, default=1_000_000, help="many_users: the large table.")
    parser.add_argument("--many_users_comparisons", type=int, default=1_000_000)
    parser.add_argument("--many_users_steps", type=int, default=100, help="many_users: steps per turn.")
    parser.add_argument("--many_users_rounds", type=int, default=3, help="many_users: turns of each trainer.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=OUTPUT_DIR)
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="Parts to run; with fewer than all, the other parts of an existing speed.json are kept.",
    )
    parser.add_argument("--smoke", action="store_true", help="A tiny run (seconds).")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--part_output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.new_users, args.registered_users = 1, 20, 10_000
        args.scoring_batch, args.scoring_rounds = 8, 2
        args.few_users, args.many_users, args.many_users_comparisons = 10, 2_000, 4_000
        args.many_users_steps, args.many_users_rounds = 4, 1

    if args.part:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
        result = globals()[f"part_{args.part}"](args, tokenizer)
        with open(args.part_output, "w") as file:
            json.dump(result, file)
        return

    args.forward = [a for a in (argv if argv is not None else sys.argv[1:])]
    start = time.perf_counter()
    command = "python examples/benchmarks/speed.py" + (" --smoke" if args.smoke else "")
    partial = set(args.parts) != set(PARTS)
    previous_path = os.path.join(args.output_dir, "speed.json")
    results = {}
    if partial and os.path.exists(previous_path):  # keep the other parts' figures
        with open(previous_path) as file:
            results = json.load(file)
    if not partial:
        results = {"machine": machine(), "command": command}
        results["config"] = {
            k: v for k, v in vars(args).items() if k not in ("forward", "part", "part_output", "output_dir", "parts")
        }
        # Each part in a fresh interpreter so that peak RSS figures do not mix; the smoke run stays in-process.
        results["parts_in_own_process"] = not args.smoke
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM)) if args.smoke else None
    for part in [part for part in PARTS if part in args.parts]:
        part_start = time.perf_counter()
        results[part] = globals()[f"part_{part}"](args, tokenizer) if args.smoke else run_part(part, args)
        if partial:  # where and how this part was measured, apart from the rest of the file
            results[part]["measured"] = {
                "machine": machine(),
                "command": f"{command} --parts {part}",
                "wall_time_seconds": time.perf_counter() - part_start,
            }
    results.setdefault("targets", {})
    if "adapt" in results:
        adapt = results["adapt"]
        results["targets"][f"{adapt['users']} new users fitted in under 5 s (either prior)"] = adapt["fit_seconds"] < 5
        print(
            f"Adapting {adapt['users']} new users ({adapt['comparisons']} comparisons): "
            + ", ".join(f"{name} prior {fit['seconds']:.2f} s" for name, fit in adapt["fits"].items())
            + f" (+ {adapt['encode_new_texts_seconds']:.1f} s encoding their new texts)"
        )
    if all(part in results for part in ("cached", "naive", "scoring", "users")):
        print_persona_parts(results, args)
    if "many_users" in results:
        print_many_users(results)
    if not partial:
        results["wall_time_seconds"] = time.perf_counter() - start
    for target, met in results["targets"].items():
        print(f"- {target}: {'met' if met else 'MISSED'}")
    path = write_json("speed", results, args.output_dir)
    if all(part in results for part in ("cached", "naive", "scoring")):
        plot(results, os.path.join(args.output_dir, "speed.png"))
    print(f"Wrote {path} ({time.perf_counter() - start:.0f} s).")


def print_persona_parts(results: dict, args) -> None:
    cached, naive, scoring, users = (results[p] for p in ("cached", "naive", "scoring", "users"))
    results["training_speedup"] = naive["seconds"] / cached["seconds"]
    results["targets"].update(
        {
            "cached training >= 10x faster than the naive loop": results["training_speedup"] >= 10,
            "accuracy within 2 points of the naive loop": abs(cached["test_accuracy"] - naive["test_accuracy"])
            <= 0.02,
            "PAL-A scoring adds under 5% to the backbone forward": scoring["pal_a_over_backbone"] < 1.05,
        }
    )
    rows = [
        [
            "training, embedding cache",
            f"{cached['seconds']:.1f} s",
            f"{cached['peak_rss_mb']:.0f} MB",
            f"{cached['test_accuracy']:.3f}",
        ],
        [
            "training, naive loop",
            f"{naive['seconds']:.1f} s",
            f"{naive['peak_rss_mb']:.0f} MB",
            f"{naive['test_accuracy']:.3f}",
        ],
    ]
    print("\n## Speed\n")
    print(markdown_table(["run", "wall time", "peak RSS", "test accuracy"], rows))
    print(
        f"\nTraining speed-up of the cache: {results['training_speedup']:.1f}x ({results['config']['epochs']} epochs)"
    )
    print(
        f"Scoring (batch {scoring['batch_size']}): PAL-A / backbone = {scoring['pal_a_over_backbone']:.3f}; PAL-B / "
        f"(backbone on items + prompts) = {scoring['pal_b_over_backbone_items_and_prompts']:.3f}; PAL-B / backbone = "
        f"{scoring['pal_b_over_backbone']:.3f}"
    )
    print(
        f"{users['registered_users']:,} registered users: RSS {users['rss_before_mb']:.0f} -> "
        f"{users['rss_after_mb']:.0f} MB (peak {users['peak_rss_mb']:.0f} MB), registered in "
        f"{users['register_seconds']:.1f} s, lookup {users['lookup_seconds'] * 1e3:.2f} ms"
    )


def print_many_users(results: dict) -> None:
    scale = results["many_users"]
    many, few, dense = scale["many_users"], scale["few_users"], scale["many_users_dense"]
    results["targets"].update(
        {
            f"{many['users']:,} users x {scale['comparisons']:,} comparisons: set-up under 30 s": many["setup_seconds"]
            < 30,
            f"steps with {many['users']:,} users within 2x of {few['users']:,} users": scale[
                "step_ratio_many_over_few"
            ]
            <= 2,
        }
    )
    rows = [
        [
            f"{table['users']:,} users ({table['user_table_update']}: {'sparse' if table['sparse'] else 'dense'})",
            f"{table['setup_seconds']:.1f} s",
            f"{table['step_seconds_median'] * 1e3:.1f} ms",
        ]
        for table in (few, many, dense)
    ]
    print(f"\n## {many['users']:,} users x {scale['comparisons']:,} comparisons (random features)\n")
    print(markdown_table(["user table", "trainer set-up", "median step"], rows))
    print(
        f"\nStep time {many['users']:,} / {few['users']:,} users: {scale['step_ratio_many_over_few']:.2f}x (dense "
        f"user-table updates: {scale['step_ratio_dense_over_few']:.2f}x); per-user evaluation of "
        f"{many['evaluated_users']:,} users on {scale['comparisons']:,} comparisons: {many['evaluate_seconds']:.1f} s; "
        f"peak RSS {scale['peak_rss_mb']:.0f} MB"
    )


if __name__ == "__main__":
    main()
