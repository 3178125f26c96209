"""Segmentation: masks as a source, decoder heads on a truncated backbone, segmentation metrics, the dense probe.

    source.py    image + mask pairs (DATA/{train,val}/{images,masks}/<name>, or a CSV image,mask[,split]), checked
    transforms.py  the same crop and flip for an image and its mask (masks resized with nearest)
    model.py     the backbone cut at a tap plus a decoder (--decoder conv:256 | linear), upsampled to the input
    metrics.py   pixel accuracy, per-class IoU, mean IoU and Dice from a confusion matrix
    train.py     `featx finetune --task segment`: the loss, the metric totals, the trainer, the preview PNG
    probe.py     the cheap path: a per-pixel linear head on cached (N, C, H, W) maps, its predict and evaluate

Importing this package loads nothing heavy; the modules import torch / sklearn themselves.
"""
