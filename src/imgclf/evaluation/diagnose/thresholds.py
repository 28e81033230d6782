"""The named thresholds of the diagnosis, each with why it has its value, and the verdict kinds.

The rules are rules of thumb for typical runs; the comments say what each number stands for.
"""

from __future__ import annotations

__all__ = [
    "DROPPED_SHARE",
    "HEADLINES",
    "IMBALANCE_RATIO",
    "LATE_FRACTION",
    "LEAK_TEST_GAP",
    "LIST_LIMIT",
    "MIN_EPOCHS_AFTER_BEST",
    "MIN_EPOCHS_TO_JUDGE",
    "MIN_STEPS_TO_JUDGE",
    "OVERFIT_ACC_GAP",
    "OVERFIT_VAL_RISE",
    "PRETRAINED_CANDIDATES",
    "RECALL_SHORTFALL",
    "SMALL_SPLIT_HALF_WIDTH",
    "SPIKE_MIN_RISE",
    "SPIKE_RATIO",
    "STILL_IMPROVING",
    "TAIL_EPOCHS",
    "TRAIN_FITTED",
    "UNDERFIT_ACCURACY",
    "VAL_ACC_DROP",
    "VAL_ACC_DROPS",
    "VERDICT_KINDS",
    "Z",
]

VERDICT_KINDS = (
    "too_early",
    "overfitting",
    "underfitting",
    "good_fit",
    "no_validation",
    "few_steps",
    "small_splits",
    "unstable",
    "imbalance",
    "leakage",
)
HEADLINES = ("too_early", "overfitting", "underfitting", "good_fit", "no_validation")

Z = 1.96  # two-sided 95 %

# --- enough training to judge -----------------------------------------------------------------------------------
# Before 3 epochs and 30 optimizer steps a curve has too few points and the weights too few updates to tell a
# trend from the start of training: no over- or underfitting verdict. (120 face images with batch 64: 1 step per
# epoch; the old rules called its first 3 steps "overfitting from epoch 1".)
MIN_EPOCHS_TO_JUDGE = 3
MIN_STEPS_TO_JUDGE = 30
# More than 10 % of the training images left out of every epoch is worth a line.
DROPPED_SHARE = 0.10

# --- small splits -----------------------------------------------------------------------------------------------
# A split whose 95 % interval reaches more than 10 points either side of its accuracy cannot tell apart two runs
# 10 points apart: its figures are reported as too small to conclude from.
SMALL_SPLIT_HALF_WIDTH = 0.10

# --- overfitting: val loss turns up after its minimum while train loss keeps falling ----------------------------
# A val loss 10 % above its minimum, in every one of the last epochs (and beyond its noise), is a trend.
OVERFIT_VAL_RISE = 0.10
# Train accuracy 10+ points above val accuracy (beyond the noise of both) once val loss has stopped improving:
# the model memorises. Small CNNs with BatchNorm often stall rather than climb in val loss when they overfit.
OVERFIT_ACC_GAP = 0.10
# One worse epoch after the best is noise; two in a row make a trend.
MIN_EPOCHS_AFTER_BEST = 2
# "The end" of a run is its last 3 epochs; the rise must hold in all of them, so one bad epoch decides nothing.
TAIL_EPOCHS = 3

# --- underfitting -----------------------------------------------------------------------------------------------
# Neither split reaches 80 % accuracy (val: even the top of its interval). Val counts as well because
# MixUp/CutMix lower the measured train accuracy.
UNDERFIT_ACCURACY = 0.80
# "The last epochs" are the last 20 % of the run (at least 2 epochs).
LATE_FRACTION = 0.20
# Train and val loss each still fell 5 %+ over those epochs: more epochs would still pay off.
STILL_IMPROVING = 0.05
# ...unless train accuracy is already 98 %+: the training data is fitted, and a falling loss is polishing.
TRAIN_FITTED = 0.98

# --- unstable ---------------------------------------------------------------------------------------------------
# A loss 1.5x the previous epoch's is a jump, not noise, and it must also rise by 0.05 (0.01 -> 0.02 is not one).
SPIKE_RATIO = 1.5
SPIKE_MIN_RISE = 0.05
# Val accuracy falling 10+ points (and beyond its noise) in one epoch, at least twice, is oscillation.
VAL_ACC_DROP = 0.10
VAL_ACC_DROPS = 2

# --- imbalance --------------------------------------------------------------------------------------------------
# The largest class has 3x the training images of the smallest: losses start to favour the large classes.
IMBALANCE_RATIO = 3.0
# A small class whose recall is 10+ points below the mean recall (beyond its noise) is one the imbalance hurts.
RECALL_SHORTFALL = 0.10

# --- leakage ----------------------------------------------------------------------------------------------------
# Without identical images, test accuracy must exceed val accuracy by 5+ points AND by more than the noise of the
# two splits before the test split looks suspiciously easy. (One image in 12 is 8 points, and noise.)
LEAK_TEST_GAP = 0.05

# Pretrained models worth suggesting, in order, when their weights are found offline.
PRETRAINED_CANDIDATES = ("tf_efficientnet_lite0", "resnet18", "mobilenetv3_large_100", "efficientnet_b0", "resnet50")

# How many epochs, classes or files one evidence line names before saying "and N more".
LIST_LIMIT = 5
