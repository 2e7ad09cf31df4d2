"""Reduce batch, the guard and %%oomsafe on real third-party training code, copied faithfully.

Only the data are replaced (seeded random tensors) and sizes scaled so that the OOM happens on a
small simulated card. Sources:

- PyTorch tutorials, "Training a classifier" (CIFAR-10): pytorch/tutorials
  beginner_source/blitz/cifar10_tutorial.py (the Net class, SGD with momentum, the 2-epoch loop with
  running_loss printed every 2000 mini-batches, here every 2; "Training on GPU" moves net and data).
- pytorch/examples mnist/main.py: Net, train(), test(), the argparse -> train_kwargs ->
  DataLoader(**kwargs) setup, Adadelta + StepLR, and the epoch loop calling train()/test().
- karpathy/nanoGPT train.py (the `while True` loop: lr schedule, estimate_loss, checkpointing,
  micro-steps with get_batch prefetch, GradScaler, grad clipping, iter_num) and model.py (GPT,
  in tests/data/real_code/nanogpt_model.py), with config/train_shakespeare_char.py scaled down.
  The memmapped .bin files are replaced by seeded random tokens.

Each test drives a real IPython InteractiveShell (the `shell` fixture) as a user types the cells.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

import jupyter_gpumem

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

HERE = os.path.dirname(os.path.abspath(__file__))


def _weights(model: Any) -> list[Any]:
    return [p.detach().clone() for p in model.parameters()]


def _same(a: list[Any], b: list[Any]) -> bool:
    # by value: one side may be on the simulated card, the other a host copy
    return len(a) == len(b) and all(
        torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b, strict=True)
    )


# ------------------------------------------------------------------------------------------------
# pytorch/tutorials beginner_source/blitz/cifar10_tutorial.py

CIFAR_DATA = """\
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

# CIFAR10 replaced by seeded random tensors (3x32x32, 10 classes); num_workers=2 -> 0
torch.manual_seed(0)
trainset = torch.utils.data.TensorDataset(torch.randn(N, 3, 32, 32), torch.randint(0, 10, (N,)))
trainloader = torch.utils.data.DataLoader(trainset, batch_size=512, shuffle=True, num_workers=0)

classes = ('plane', 'car', 'bird', 'cat',
           'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
"""
CIFAR_NET = """\
class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x


device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
net = Net()
net.to(device)

criterion = nn.CrossEntropyLoss()
optimizer = optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
"""
CIFAR_TRAIN = """\
for epoch in range(2):  # loop over the dataset multiple times

    running_loss = 0.0
    for i, data in enumerate(trainloader, 0):
        # get the inputs; data is a list of [inputs, labels]
        inputs, labels = data[0].to(device), data[1].to(device)

        # zero the parameter gradients
        optimizer.zero_grad()

        # forward + backward + optimize
        outputs = net(inputs)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()

        # print statistics
        running_loss += loss.item()
        if i % 2 == 1:    # print every 2 mini-batches
            print('[%d, %5d] loss: %.3f' %
                  (epoch + 1, i + 1, running_loss / 2))
            running_loss = 0.0

print('Finished Training')
"""
CIFAR_CARD = "24MiB"


def _cifar_setup(shell: Any, batch: int = 512, n: int = 2048) -> None:
    # the data are made before the simulated card: it counts every tensor made while it runs
    shell.run_cell("%gpumem simulate off")
    cell = CIFAR_DATA.replace("batch_size=512", f"batch_size={batch}").replace("N", str(n))
    assert shell.run_cell(cell).success
    shell.run_cell(f"%gpumem simulate {CIFAR_CARD}")
    assert shell.run_cell(CIFAR_NET).success


def _cifar_state(shell: Any) -> dict[str, Any]:
    ns = shell.user_ns
    return {
        "weights": _weights(ns["net"]),
        "momentum": [s["momentum_buffer"].clone() for s in ns["optimizer"].state.values()],
        "running_loss": ns["running_loss"],
        "i": ns["i"],
        "epoch": ns["epoch"],
        "rng": torch.get_rng_state().clone(),
    }


def _printed_losses(text: str) -> list[str]:
    return re.findall(r"^\[\d, +\d+\] loss: [\d.]+$", text, re.M)


def test_cifar10_tutorial_reduce_batch_equals_one_clean_run(
    shell: Any, capsys: Any, run: Any
) -> None:
    """The tutorial's loop iterates the notebook's `trainloader`: Reduce batch finds it, needs no
    --force (nothing ran before the first forward), and ends exactly as one clean run at the batch
    it found: weights, momentum buffers, running_loss, the printed losses, the random generator."""
    _cifar_setup(shell)
    assert not shell.run_cell(CIFAR_TRAIN).success
    assert jupyter_gpumem.last_failure(shell).earlier_passes is False
    shell.run_cell("later = [1, 2, 3]\nnotes = 'mine'")
    out = run(shell, "%gpumem retry batch", store_history=False).out
    assert "Fits at batch" in out, out
    assert "Re-run anyway" not in out, out
    assert len(re.findall(r"\bkept\b", out)) == 1, out
    assert "trainloader" in out  # says what to change
    batch = shell.user_ns["trainloader"].batch_size
    assert 1 < batch < 512
    fixed = _cifar_state(shell)
    # the real run's prints are the last ones, after the last rehearsal's line
    real_prints = _printed_losses(out.rsplit("rolled back", 1)[-1])
    assert shell.user_ns["later"] == [1, 2, 3] and shell.user_ns["notes"] == "mine"

    _cifar_setup(shell, batch)
    assert shell.run_cell(CIFAR_TRAIN).success
    clean_out = capsys.readouterr().out
    clean = _cifar_state(shell)
    assert real_prints == _printed_losses(clean_out) != []
    assert _same(fixed["weights"], clean["weights"])
    assert _same(fixed["momentum"], clean["momentum"])
    assert (fixed["running_loss"], fixed["i"], fixed["epoch"]) == (
        clean["running_loss"],
        clean["i"],
        clean["epoch"],
    )
    assert torch.equal(fixed["rng"], clean["rng"])


def test_cifar10_tutorial_oomsafe_equals_one_clean_run(shell: Any, capsys: Any) -> None:
    """%%oomsafe on the same loop: the fix it keeps ran once; the momentum buffers and the weights
    are those of one clean run at that batch."""
    _cifar_setup(shell)
    capsys.readouterr()
    assert shell.run_cell("%%oomsafe --fixes clear,batch\n" + CIFAR_TRAIN).success
    out = capsys.readouterr().out
    assert "Re-run anyway" not in out, out
    batch = shell.user_ns["trainloader"].batch_size
    assert 1 < batch < 512, out
    fixed = _cifar_state(shell)
    _cifar_setup(shell, batch)
    assert shell.run_cell(CIFAR_TRAIN).success
    clean = _cifar_state(shell)
    assert _same(fixed["weights"], clean["weights"])
    assert _same(fixed["momentum"], clean["momentum"])
    assert fixed["running_loss"] == clean["running_loss"]


def test_cifar10_tutorial_reduce_batch_survives_a_real_run_that_fails(shell: Any, run: Any) -> None:
    _cifar_setup(shell, n=1024)
    assert not shell.run_cell(CIFAR_TRAIN).success
    out = run(shell, "%gpumem retry batch", store_history=False).out
    assert "Fits at batch" in out, out
    assert shell.user_ns["trainloader"].batch_size < 289


# ------------------------------------------------------------------------------------------------
# karpathy/nanoGPT train.py + model.py (config/train_shakespeare_char.py, scaled down)

NANOGPT_MODEL_PATH = os.path.join(HERE, "data", "real_code", "nanogpt_model.py")

NANOGPT_SETUP = """\
import os
import time
import math
import pickle
from contextlib import nullcontext

import numpy as np
import torch

# config/train_shakespeare_char.py, scaled down
out_dir = OUT_DIR
eval_interval = 2
log_interval = 1
eval_iters = 1
eval_only = False
always_save_checkpoint = False
init_from = 'scratch'
wandb_log = False
dataset = 'shakespeare_char'
gradient_accumulation_steps = 2
batch_size = BATCH
block_size = 16
n_layer = 2
n_head = 2
n_embd = 64
dropout = 0.2
bias = False
learning_rate = 1e-3
max_iters = 2
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
decay_lr = True
warmup_iters = 1
lr_decay_iters = 2
min_lr = 1e-4
device = 'cuda'
dtype = 'float16'
compile = False
config_keys = [k for k,v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
config = {k: globals()[k] for k in config_keys}

ddp = False
master_process = True
seed_offset = 0
ddp_world_size = 1
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size

if master_process:
    os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(1337 + seed_offset)
torch.backends.cuda.matmul.allow_tf32 = True # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True # allow tf32 on cudnn
device_type = 'cuda' if 'cuda' in device else 'cpu' # for later use in torch.autocast
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if device_type == 'cpu' else torch.amp.autocast(device_type=device_type, dtype=ptdtype)

# poor man's data loader: the memmapped .bin files replaced by seeded random tokens
_rng = np.random.default_rng(0)
train_data = _rng.integers(0, 65, 20000).astype(np.uint16)
val_data = _rng.integers(0, 65, 2000).astype(np.uint16)
def get_batch(split):
    if split == 'train':
        data = train_data
    else:
        data = val_data
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy((data[i:i+block_size]).astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy((data[i+1:i+1+block_size]).astype(np.int64)) for i in ix])
    if device_type == 'cuda':
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    else:
        x, y = x.to(device), y.to(device)
    return x, y

iter_num = 0
best_val_loss = 1e9
meta_vocab_size = 65

model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                  bias=bias, vocab_size=None, dropout=dropout)
if init_from == 'scratch':
    model_args['vocab_size'] = meta_vocab_size if meta_vocab_size is not None else 50304
    gptconf = GPTConfig(**model_args)
    model = GPT(gptconf)
model.to(device)

scaler = torch.amp.GradScaler('cuda', enabled=(dtype == 'float16'))

optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
checkpoint = None # free up memory

@torch.no_grad()
def estimate_loss():
    out = {}
    model.eval()
    for split in ['train', 'val']:
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split)
            with ctx:
                logits, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean()
    model.train()
    return out

def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) # coeff ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)
"""
NANOGPT_LOOP = """\
X, Y = get_batch('train') # fetch the very first batch
t0 = time.time()
local_iter_num = 0 # number of iterations in the lifetime of this process
raw_model = model.module if ddp else model # unwrap DDP container if needed
running_mfu = -1.0
while True:

    # determine and set the learning rate for this iteration
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    # evaluate the loss on train/val sets and write checkpoints
    if iter_num % eval_interval == 0 and master_process:
        losses = estimate_loss()
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = losses['val']
            if iter_num > 0:
                checkpoint = {
                    'model': raw_model.state_dict(),
                    'optimizer': optimizer.state_dict(),
                    'model_args': model_args,
                    'iter_num': iter_num,
                    'best_val_loss': best_val_loss,
                    'config': config,
                }
                print(f"saving checkpoint to {out_dir}")
                torch.save(checkpoint, os.path.join(out_dir, 'ckpt.pt'))
    if iter_num == 0 and eval_only:
        break

    # forward backward update, with optional gradient accumulation to simulate larger batch size
    # and using the GradScaler if data type is float16
    for micro_step in range(gradient_accumulation_steps):
        with ctx:
            logits, loss = model(X, Y)
            loss = loss / gradient_accumulation_steps # scale the loss to account for gradient accumulation
        # immediately async prefetch next batch while model is doing the forward pass on the GPU
        X, Y = get_batch('train')
        # backward pass, with gradient scaling if training in fp16
        scaler.scale(loss).backward()
    # clip the gradient
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    # step the optimizer and scaler if training in fp16
    scaler.step(optimizer)
    scaler.update()
    # flush the gradients as soon as we can, no need for this memory anymore
    optimizer.zero_grad(set_to_none=True)

    # timing and logging
    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if iter_num % log_interval == 0 and master_process:
        lossf = loss.item() * gradient_accumulation_steps
        if local_iter_num >= 5: # let the training loop settle a bit
            mfu = raw_model.estimate_mfu(batch_size * gradient_accumulation_steps, dt)
            running_mfu = mfu if running_mfu == -1.0 else 0.9*running_mfu + 0.1*mfu
        print(f"iter {iter_num}: loss {lossf:.4f}")
    iter_num += 1
    local_iter_num += 1

    # termination conditions
    if iter_num > max_iters:
        break
"""


@pytest.fixture
def nanogpt(shell: Any, tmp_path: Any) -> Any:
    shell.run_cell("%gpumem simulate 32MiB")
    with open(NANOGPT_MODEL_PATH, encoding="utf-8") as f:
        assert shell.run_cell(f.read()).success  # model.py pasted into a cell

    def setup(batch: int) -> None:
        cell = NANOGPT_SETUP.replace("OUT_DIR", repr(str(tmp_path))).replace("BATCH", str(batch))
        assert shell.run_cell(cell).success

    shell.nanogpt_setup = setup
    return shell


def test_nanogpt_first_pass_failure_is_known_as_first_pass(nanogpt: Any, run: Any) -> None:
    """The forward of iteration 0 fails: only `lr`, the param groups' lr and `best_val_loss` were
    set before it; no optimizer step, no scaler step, no checkpoint had run."""
    shell = nanogpt
    shell.nanogpt_setup(256)
    assert not shell.run_cell(NANOGPT_LOOP).success
    failed = jupyter_gpumem.last_failure(shell)
    assert shell.user_ns["iter_num"] == 0 and not shell.user_ns["optimizer"].state
    out = run(shell, "%gpumem retry batch", store_history=False).out
    assert "updates the weights again" not in out, out
    assert "torch.save" not in out, out
    assert failed.earlier_passes is False


def test_model_with_a_layer_loop_in_forward_needs_no_force(shell: Any, capsys: Any) -> None:
    shell.run_cell("%gpumem simulate 48MiB")
    assert shell.run_cell(
        "import torch\n"
        "class Deep(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.layers = torch.nn.ModuleList([torch.nn.Linear(256, 256) for _ in range(2)])\n"
        "    def forward(self, x):\n"
        "        for layer in self.layers:\n"
        "            x = layer(x).relu()\n"
        "        return x\n"
        "torch.manual_seed(0)\n"
        "model = Deep().cuda()\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "history = []\n"
    ).success
    cell = (
        "batch_size = 16384\n"
        "for step in range(3):\n"
        "    x = torch.randn(batch_size, 256, device='cuda')\n"
        "    loss = model(x).square().mean()\n"
        "    opt.zero_grad()\n"
        "    loss.backward()\n"
        "    opt.step()\n"
        "    history.append(loss.item())\n"
    )
    assert not shell.run_cell(cell).success
    assert jupyter_gpumem.last_failure(shell).earlier_passes is False


# ------------------------------------------------------------------------------------------------
# pytorch/examples mnist/main.py

MNIST_DEFS = r"""
import argparse
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.optim.lr_scheduler import StepLR



class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


def train(args, model, device, train_loader, optimizer, epoch):
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        if batch_idx % args.log_interval == 0:
            print('Train Epoch: {} [{}/{} ({:.0f}%)]\tLoss: {:.6f}'.format(
                epoch, batch_idx * len(data), len(train_loader.dataset),
                100. * batch_idx / len(train_loader), loss.item()))
            if args.dry_run:
                break


def test(model, device, test_loader):
    model.eval()
    test_loss = 0
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction='sum').item()  # sum up batch loss
            pred = output.argmax(dim=1, keepdim=True)  # get the index of the max log-probability
            correct += pred.eq(target.view_as(pred)).sum().item()

    test_loss /= len(test_loader.dataset)

    print('\nTest set: Average loss: {:.4f}, Accuracy: {}/{} ({:.0f}%)\n'.format(
        test_loss, correct, len(test_loader.dataset),
        100. * correct / len(test_loader.dataset)))
"""
MNIST_SETUP = """\
parser = argparse.ArgumentParser(description='PyTorch MNIST Example')
parser.add_argument('--batch-size', type=int, default=64, metavar='N')
parser.add_argument('--test-batch-size', type=int, default=1000, metavar='N')
parser.add_argument('--epochs', type=int, default=14, metavar='N')
parser.add_argument('--lr', type=float, default=1.0, metavar='LR')
parser.add_argument('--gamma', type=float, default=0.7, metavar='M')
parser.add_argument('--no-accel', action='store_true')
parser.add_argument('--dry-run', action='store_true')
parser.add_argument('--seed', type=int, default=1, metavar='S')
parser.add_argument('--log-interval', type=int, default=10, metavar='N')
parser.add_argument('--save-model', action='store_true')
args = parser.parse_args(['--epochs', '2', '--log-interval', '2', '--test-batch-size', '16'])

use_accel = not args.no_accel and torch.cuda.is_available()

torch.manual_seed(args.seed)

if use_accel:
    device = torch.device("cuda")
else:
    device = torch.device("cpu")

train_kwargs = {'batch_size': args.batch_size}
test_kwargs = {'batch_size': args.test_batch_size}
if use_accel:
    accel_kwargs = {'num_workers': 0,
                   'shuffle': True}
    train_kwargs.update(accel_kwargs)
    test_kwargs.update(accel_kwargs)

# MNIST replaced by seeded random tensors
g = torch.Generator().manual_seed(0)
dataset1 = torch.utils.data.TensorDataset(torch.randn(96, 1, 28, 28, generator=g), torch.randint(0, 10, (96,), generator=g))
dataset2 = torch.utils.data.TensorDataset(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))
train_loader = torch.utils.data.DataLoader(dataset1,**train_kwargs)
test_loader = torch.utils.data.DataLoader(dataset2, **test_kwargs)

model = Net().to(device)
optimizer = optim.Adadelta(model.parameters(), lr=args.lr)

scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)
"""
MNIST_LOOP = """\
for epoch in range(1, args.epochs + 1):
    train(args, model, device, train_loader, optimizer, epoch)
    test(model, device, test_loader)
    scheduler.step()
"""


@pytest.fixture
def mnist(shell: Any) -> Any:
    # 56 MiB: batch 64 runs out of memory in the first forward; batch 60 fits epoch 1 but not the
    # first backward of epoch 2 (after test() has fragmented the cache); batch 41 fits the whole run
    shell.run_cell("%gpumem simulate 56MiB")
    assert shell.run_cell(MNIST_DEFS).success
    assert shell.run_cell(MNIST_SETUP).success
    assert not shell.run_cell(MNIST_LOOP).success
    return shell


def test_mnist_example_loader_passed_to_a_function_is_found_by_what_it_sizes(
    mnist: Any, run: Any
) -> None:
    """The example's loop passes `train_loader` to train(): Reduce batch finds it by the number
    that sizes the failing `data`, with no --batch-var; the failure was in the first forward, so
    nothing would repeat, and what it keeps is one real run."""
    shell = mnist
    assert jupyter_gpumem.last_failure(shell).earlier_passes is False
    out = run(shell, "%gpumem retry batch", store_history=False).out
    assert "Fits at batch" in out, out
    assert "`train_loader.batch_size` = 64 sizes `data` (64, 1, 28, 28)" in out, out
    assert "--batch-var" not in out


def test_mnist_example_test_batch_size_is_named_as_the_culprit(shell: Any, capsys: Any) -> None:
    """The example as shipped evaluates with `--test-batch-size 1000`: training at 16 fits, then
    test()'s first forward asks for more than the whole card. The diagnosis names the number that
    sized the failing tensors and where it lives, and does not call it a dead end (a smaller batch
    shrinks that allocation); Reduce batch is the fix it points to."""
    shell.run_cell("%gpumem simulate 56MiB")
    assert shell.run_cell(MNIST_DEFS).success
    setup = MNIST_SETUP.replace(
        "'--test-batch-size', '16'", "'--test-batch-size', '1000', '--batch-size', '16'"
    ).replace("torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,)",
              "torch.randn(1000, 1, 28, 28, generator=g), torch.randint(0, 10, (1000,)")  # fmt: skip
    assert shell.run_cell(setup).success
    capsys.readouterr()
    assert not shell.run_cell(MNIST_LOOP).success
    out = capsys.readouterr().out
    causes = out.split("Likely causes", 1)[1]
    first = causes.split("\n  2. ", 1)[0]
    assert "At this batch, one allocation is larger than the card" in first, out
    assert "`test_loader.batch_size` = 1000 sizes `data` (1000, 1, 28, 28) in test()" in first
    assert "Reduce the batch" in first
    assert "No fix here can make this single allocation fit" not in out
    assert "%gpumem retry batch      Reduce batch (saves" in out


def test_mnist_example_reduce_batch_ends_at_a_batch_that_fits(mnist: Any, run: Any) -> None:
    shell = mnist
    out = run(shell, "%gpumem retry batch --batch-var train_loader", store_history=False).out
    # nothing is kept when it gives up: the notebook is as the failed cell left it
    assert shell.user_ns["scheduler"].last_epoch in (0, 2)
    assert "Fits at batch" in out, out
    assert shell.user_ns["train_loader"].batch_size < 61
    assert shell.user_ns["scheduler"].last_epoch == 2
