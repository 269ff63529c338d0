"""Analysis on top of the loss: ``metrics`` (accuracy, NLL, ECE on numpy arrays) and ``figures`` (one-hot, LS
and LABO targets side by side; matplotlib from the ``examples`` extra)."""
