# Copied from the Hugging Face course, chapter 3, "A full training loop":
# https://github.com/huggingface/course/blob/main/chapters/en/chapter3/4.mdx (Apache-2.0)
# and get_linear_schedule_with_warmup (its current functools.partial form and an older closure) from
# https://github.com/huggingface/transformers/blob/main/src/transformers/optimization.py (Apache-2.0,
# Copyright 2018 The Google AI Language Team Authors and The HuggingFace Inc. team).
#
# Kept verbatim: the two DataLoaders (batch_size=8, collate_fn=data_collator, shuffle on train),
# AdamW(lr=5e-5), num_epochs = 3, num_training_steps = num_epochs * len(train_dataloader), the
# linear schedule (a LambdaLR sized in steps), `device`, and the training loop.
# Changed: transformers, datasets and tqdm do not import here, so GLUE MRPC is replaced by seeded
# random token ids of random lengths (16..128), DataCollatorWithPadding by a collate_fn that pads
# to the longest in the batch, AutoModelForSequenceClassification by TinyBert (a 2-layer
# nn.TransformerEncoder returning an object with .loss/.logits), tqdm by a counter. The cells are
# separated by "# %% name" lines; tests/test_third_party_fresh.py runs them.

# %% data
import math
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.optim.lr_scheduler import LambdaLR

# GLUE MRPC tokenized replaced by seeded random token ids of random lengths (16..128)
torch.manual_seed(0)
def _example(i):
    n = int(torch.randint(16, 129, ()).item())
    return {"input_ids": torch.randint(1, 1000, (n,)), "attention_mask": torch.ones(n, dtype=torch.long),
            "labels": torch.tensor(i % 2)}
tokenized_datasets = {"train": [_example(i) for i in range(24)], "validation": [_example(i) for i in range(8)]}

def data_collator(features):  # DataCollatorWithPadding: pad to the longest in the batch
    n = max(len(f["input_ids"]) for f in features)
    batch = {k: torch.stack([torch.nn.functional.pad(f[k], (0, n - len(f[k]))) for f in features])
             for k in ("input_ids", "attention_mask")}
    batch["labels"] = torch.stack([f["labels"] for f in features])
    return batch

train_dataloader = DataLoader(
    tokenized_datasets["train"], shuffle=True, batch_size=8, collate_fn=data_collator
)
eval_dataloader = DataLoader(
    tokenized_datasets["validation"], batch_size=8, collate_fn=data_collator
)

# %% scheduler
# transformers/optimization.py today: the lambda is a functools.partial (picklable schedulers);
# get_scheduler("linear", ...) returns get_linear_schedule_with_warmup(...)
from functools import partial


def _get_linear_schedule_with_warmup_lr_lambda(current_step: int, *, num_warmup_steps: int, num_training_steps: int):
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps)))


def get_linear_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps, last_epoch=-1):
    lr_lambda = partial(
        _get_linear_schedule_with_warmup_lr_lambda,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
    )
    return LambdaLR(optimizer, lr_lambda, last_epoch)


def get_scheduler(name, optimizer, num_warmup_steps=None, num_training_steps=None):
    assert name == "linear"  # the one schedule used here
    return get_linear_schedule_with_warmup(optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)

# %% scheduler_closure
# transformers/optimization.py before the schedulers were made picklable (e.g. v4.26): a closure
def get_linear_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps, last_epoch=-1):
    def lr_lambda(current_step: int):
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1, num_warmup_steps))
        return max(
            0.0, float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps))
        )

    return LambdaLR(optimizer, lr_lambda, last_epoch)

# %% setup
class SequenceClassifierOutput:
    def __init__(self, loss, logits):
        self.loss, self.logits = loss, logits

class TinyBert(nn.Module):  # AutoModelForSequenceClassification stand-in
    def __init__(self, vocab=1000, d=64, heads=4, layers=2, num_labels=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(512, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.classifier = nn.Linear(d, num_labels)
    def forward(self, input_ids, attention_mask, labels=None):
        x = self.emb(input_ids) + self.pos(torch.arange(input_ids.size(1), device=input_ids.device))
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        logits = self.classifier(x[:, 0])
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss, logits)

class tqdm:  # tqdm.auto.tqdm stand-in: counts updates
    def __init__(self, iterable):
        self.total, self.n = len(iterable), 0
    def update(self, n=1):
        self.n += n

model = TinyBert()

from torch.optim import AdamW

optimizer = AdamW(model.parameters(), lr=5e-5)

num_epochs = 3
num_training_steps = num_epochs * len(train_dataloader)
lr_scheduler = get_scheduler(
    "linear",
    optimizer=optimizer,
    num_warmup_steps=0,
    num_training_steps=num_training_steps,
)
print(num_training_steps)

device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
model.to(device)
device

# %% train
progress_bar = tqdm(range(num_training_steps))

model.train()
for epoch in range(num_epochs):
    for batch in train_dataloader:
        batch = {k: v.to(device) for k, v in batch.items()}
        outputs = model(**batch)
        loss = outputs.loss
        loss.backward()

        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        progress_bar.update(1)
