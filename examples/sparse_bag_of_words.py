"""A bag-of-words classifier with a large sparse embedding, trained with SM3.

The data are made here: a 200,000-word vocabulary with Zipf-like word
frequencies; each of 8 topics favours its own 2,000 words, and a document is
24 words drawn from its topic's words (10%) and the general vocabulary (90%).
The model is ``nn.EmbeddingBag(sparse=True)`` (mean of word vectors) and a
linear layer.  SM3 (``sm3fn.optim.SM3``) updates only the embedding rows of
the words in each batch and keeps one number per row for them; the script
prints the loss and held-out accuracy as it trains, then the optimizer state
it keeps next to Adam's (``torch.optim.SparseAdam`` for the embedding,
``torch.optim.Adam`` for the rest, after one step: their state is allocated
on the first step).

    python examples/sparse_bag_of_words.py
"""

from __future__ import annotations

import time

import torch

from sm3fn.optim import SM3

VOCAB, DIM, TOPICS, TOPIC_WORDS, DOC_LEN = 200_000, 32, 8, 2000, 24


def make_data(n_docs: int, generator: torch.Generator):
    """Documents (word ids, ``n_docs x DOC_LEN``) and their topics."""
    topics = torch.randint(TOPICS, (n_docs,), generator=generator)
    zipf = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)
    background = torch.multinomial(zipf, n_docs * DOC_LEN, replacement=True, generator=generator)
    # topic t's words: a fixed random block of the vocabulary
    topic_words = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(7))[: TOPICS * TOPIC_WORDS]
    picks = torch.randint(TOPIC_WORDS, (n_docs, DOC_LEN), generator=generator)
    own = topic_words.view(TOPICS, TOPIC_WORDS)[topics[:, None], picks]
    from_topic = torch.rand(n_docs, DOC_LEN, generator=generator) < 0.1
    docs = torch.where(from_topic, own, background.view(n_docs, DOC_LEN))
    return docs, topics


class BagOfWords(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.EmbeddingBag(VOCAB, DIM, mode="mean", sparse=True)
        self.out = torch.nn.Linear(DIM, TOPICS)

    def forward(self, docs):
        return self.out(self.embed(docs))


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def main() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    train_docs, train_topics = make_data(20_000, gen)
    test_docs, test_topics = make_data(2_000, gen)
    model = BagOfWords()
    opt = SM3(model.parameters(), lr=0.5)
    def accuracy():
        with torch.no_grad():
            return (model(test_docs).argmax(1) == test_topics).float().mean().item()

    print(f"step    0  held-out accuracy {accuracy():.3f}  (chance: {1 / TOPICS:.3f})")
    start = time.perf_counter()
    for step in range(1, 1501):
        batch = torch.randint(train_docs.shape[0], (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(train_docs[batch]), train_topics[batch])
        opt.zero_grad()
        loss.backward()  # model.embed.weight.grad is a sparse COO tensor
        opt.step()
        if step % 300 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}  held-out accuracy {accuracy():.3f}")
    print(f"trained in {time.perf_counter() - start:.1f} s")

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    adam_model = BagOfWords()
    adams = [torch.optim.SparseAdam([adam_model.embed.weight]), torch.optim.Adam(adam_model.out.parameters())]
    torch.nn.functional.cross_entropy(adam_model(train_docs[:64]), train_topics[:64]).backward()
    for a in adams:
        a.step()
    sm3_state, adam_state = state_bytes(opt), sum(state_bytes(a) for a in adams)
    print(f"parameters:                  {params / 2**20:8.2f} MiB")
    print(f"SM3 state (sm3fn.optim.SM3): {sm3_state / 2**20:8.2f} MiB  "
          f"(embedding: accumulator_0 {tuple(opt.state[model.embed.weight]['accumulator_0'].shape)})")
    print(f"Adam state (SparseAdam+Adam):{adam_state / 2**20:8.2f} MiB  "
          f"({adam_state / max(sm3_state, 1):.0f}x SM3's)")


if __name__ == "__main__":
    main()
