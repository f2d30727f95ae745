"""The probe tier: frozen-backbone evaluations that take seconds to minutes.

A detector fine-tune is slow and noisy; a probe reads the backbone as it is. ``tissue``
classifies patches from pooled features (k-NN and a linear probe), ``dense`` segments glands
with a 1 x 1 conv on frozen stage features. ``stage.run_probes`` runs them for one backbone
under MLflow children; the pure parts (``knn``, ``linear``, ``dense``) take tensors and arrays.
"""
