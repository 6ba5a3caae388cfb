"""Sequences that share a prefix (a prompt and its responses), packed padding-free with the prefix once, and the
reward model's micro-batches of preference pairs built on it (:func:`pair_batches`).

The reward model reads K responses of a prompt; laid out alone, each repeats the prompt. :func:`pack` puts a
group's prompt once in a row and each response's tail after it, with a 4-D mask so that every sequence sees
exactly what it sees alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tuneoff.data.pairs import TokenizedPair, response_length


def shared_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists, leaving each at least its last token of its own."""
    limit = min(len(a), len(b)) - 1
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def pack(
    sequences: list[list[int]], groups: list[list[int]] | None = None, pad_id: int = 0, width: int | None = None
) -> dict:
    """The sequences laid into rows of ``width`` tokens, each group's shared prefix (its prompt) once, no padding.

    ``groups`` lists sequence numbers that share a prompt (each sequence in one group; default: each alone;
    a group of more than two whose members share no first token is laid out as singletons, so a run never
    grows past two sequences without a prefix to share). A group becomes one run of tokens: the prefix x its
    members share (each keeps at least its last token), then every member's tail in turn, positions restarting
    at len(x) for each tail; a tail attends to x and to itself, never to another member's tail. So every sequence
    sees exactly what it sees alone (the rewards equal
    the padded forward's, tested), and a prompt is encoded once instead of once per response. Groups go into
    rows of ``width`` tokens (default :func:`tuneoff.data.tokenize.row_width`) by SFT packing's first-fit bins:
    rows of bounded width rather than one long row, since attention costs the square of a row's length.

    Returns packed_ids and packed_positions (R, W), packed_mask (R, 1, W, W) (True: query may attend to key),
    token_index (N,) (where each token of the sequences sits in the flattened rows, sequence after sequence; a
    prefix position appears once for each member) and segments (N,) (its sequence, 0..len(sequences)-1)."""
    from tuneoff.data.tokenize import Tokenized, filler_id, row_width
    from tuneoff.data.tokenize import pack as first_fit

    given = [[i] for i in range(len(sequences))] if groups is None else groups
    assert sorted(i for g in given for i in g) == list(range(len(sequences))), "every sequence in exactly one group"
    groups, shared = [], []  # the groups laid out, and the prefix length each shares
    for g in given:
        s = min((shared_prefix(sequences[g[0]], sequences[m]) for m in g[1:]), default=0)
        if len(g) > 2 and s == 0:  # nothing shared (prompts cut from the left): singletons, not one long run
            groups += [[m] for m in g]
            shared += [0] * len(g)
        else:
            groups.append(g)
            shared.append(s)
    runs = [
        Tokenized(sequences[g[0]][:s] + [t for m in g for t in sequences[m][s:]], []) for g, s in zip(groups, shared)
    ]
    width = max(width or row_width([len(r.input_ids) for r in runs]), max(len(r.input_ids) for r in runs))
    bins = first_fit(runs, width)
    ids = torch.full((len(bins), width), filler_id(pad_id), dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    group = torch.full((len(bins), width), -1, dtype=torch.long)  # group number; -1 for filler
    branch = torch.zeros((len(bins), width), dtype=torch.long)  # 0 prefix, k for the k-th member's tail
    flat: dict[int, list[int]] = {}  # sequence -> flat positions of its tokens
    number = {id(r): i for i, r in enumerate(runs)}
    for row, members in enumerate(bins):
        start = 0
        for run in members:
            g = number[id(run)]
            s, base = shared[g], row * width + start
            ids[row, start : start + len(run.input_ids)] = torch.tensor(run.input_ids)
            positions[row, start : start + s] = torch.arange(s)
            group[row, start : start + len(run.input_ids)] = g
            at = start + s
            for k, m in enumerate(groups[g], start=1):
                n = len(sequences[m]) - s
                positions[row, at : at + n] = torch.arange(s, s + n)
                branch[row, at : at + n] = k
                flat[m] = list(range(base, base + s)) + list(range(row * width + at, row * width + at + n))
                at += n
            start += len(run.input_ids)
    same = (group[:, :, None] == group[:, None, :]) & (group[:, :, None] >= 0)  # (R, W, W) query, key
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])  # the prefix, or its own tail
    mask = (same & causal & visible) | torch.eye(width, dtype=torch.bool)  # filler attends to itself only
    token_index = torch.tensor([j for i in range(len(sequences)) for j in flat[i]])
    segments = torch.tensor([k for k, seq in enumerate(sequences) for _ in seq])
    return {
        "packed_ids": ids,
        "packed_positions": positions,
        "packed_mask": mask[:, None],
        "token_index": token_index,
        "segments": segments,
    }


def pair_pack(chosen: list[list[int]], rejected: list[list[int]], pad_id: int = 0, width: int | None = None) -> dict:
    """:func:`pack` of B pairs, each pair a group: chosen sequences 0..B-1, rejected B..2B-1."""
    B = len(chosen)
    return pack(chosen + rejected, [[i, B + i] for i in range(B)], pad_id, width)


def fit_left(ids: list[int], max_length: int) -> list[int]:
    """Keep the last ``max_length`` tokens: the reward is read at the end, so the prompt's start goes first."""
    return ids[-max_length:]


def pad_right(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T_max), right-padded."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, : len(r)] = 1
    return input_ids, attention_mask


def pair_batches(
    pairs: list[TokenizedPair],
    batch_size: int,
    max_length: int,
    pad_id: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> list[dict]:
    """Micro-batches of B pairs for one epoch in a seeded order, the pairs of one prompt next to each other.

    A pair's sequences are prompt + chosen and prompt + rejected, each keeping its last ``max_length`` tokens
    (:func:`fit_left`; the scorer's ``encode_response`` and ``fit_left`` give the same ids). The order is a seeded
    permutation of the pairs, then stably grouped by prompt (each prompt where its first pair fell), so data with
    one pair per prompt keeps the plain permutation; a batch boundary may still cut a prompt's pairs (K = 4,
    B = 32: about one prompt in eight). A response that several pairs of a batch compare (K responses of a
    prompt, all C(K, 2) pairs labelled) is scored once: a batch holds its U distinct sequences and, per pair,
    the index of its chosen and its rejected one."""
    order = (
        torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        if shuffle
        else list(range(len(pairs)))
    )
    first: dict[str, int] = {}
    for i in order:
        first.setdefault(pairs[i].group, len(first))
    ordered = [pairs[i] for i in sorted(order, key=lambda i: first[pairs[i].group])]  # sorted is stable
    batches = []
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        sides = {
            side: [tuple(fit_left(p.prompt + getattr(p, side), max_length)) for p in chunk]
            for side in ("chosen", "rejected")
        }
        # Distinct sequences numbered chosen sides first, then rejected sides: with one pair per prompt, the B
        # chosen then the B rejected, the layout (and float summation order) of plain pairs.
        index: dict[tuple[int, ...], int] = {}  # distinct sequence -> its number in the batch
        # prompt -> its distinct sequences (a sequence two prompts share after truncation goes to the first)
        members: dict[str, list[int]] = {p.group: [] for p in chunk}
        for side in ("chosen", "rejected"):
            for p, tokens in zip(chunk, sides[side]):
                if tokens not in index:
                    index[tokens] = len(index)
                    members[p.group].append(index[tokens])
        sequences = [list(t) for t in index]
        input_ids, attention_mask = pad_right(sequences, pad_id)  # (U, T)
        lengths = [response_length(p.chosen) for p in chunk] + [response_length(p.rejected) for p in chunk]
        batches.append(
            {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                **pack(sequences, [m for m in members.values() if m], pad_id),
                "chosen_index": torch.tensor([index[t] for t in sides["chosen"]]),  # (B,)
                "rejected_index": torch.tensor([index[t] for t in sides["rejected"]]),  # (B,)
                "margin": torch.tensor([p.margin for p in chunk]),  # (B,)
                "length": torch.tensor(lengths),  # (2B,) response tokens, for the length-bias probe
            }
        )
    return batches
