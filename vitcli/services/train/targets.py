"""Training targets and hit counts: class indices for one-class images, and a distribution
over the classes for images of several classes at once (data/folder.py's group folders)."""

from __future__ import annotations

import torch


def label_targets(
    num_classes: int, groups: list[list[int]], device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """(K + G, K) on `device`: one-hot rows for the classes, then 1/len(g) on each class of
    group g; None without groups (targets stay class indices, the cheaper and usual path)."""
    if not groups:
        return None
    table = torch.zeros(num_classes + len(groups), num_classes)
    table[:num_classes] = torch.eye(num_classes)
    for row, group in enumerate(groups, start=num_classes):
        table[row, group] = 1.0 / len(group)
    return table.to(device)


def hits(logits: torch.Tensor, labels: torch.Tensor, k: int, table: torch.Tensor | None) -> int:
    """Images whose top-k holds their class; for a group label, top-1 counts when the best class
    is one of the group's, top-k (k > 1) when all of the group's classes are in the top k."""
    if table is None:
        return topk_correct(logits, labels, k)
    wanted = table.to(logits.device)[labels] > 0  # B,K
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # B,k
    in_top = torch.zeros_like(wanted).scatter_(1, top, True)
    if k == 1:
        return int((wanted & in_top).any(dim=1).sum().item())
    return int((~wanted | in_top).all(dim=1).sum().item())


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # B,k
    return int((top == labels[:, None]).any(dim=1).sum().item())
