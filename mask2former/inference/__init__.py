"""Inference: a model's probabilities (:mod:`.predictor`), where they go (:mod:`.sinks`: submission
CSV, probability dump, label PNGs, score, overlays), probability dumps (:mod:`.prob_dump`), the
submission format (:mod:`.submission`), soft-voting ensembles (:mod:`.ensemble`) and their
post-processing chain (:mod:`.pipeline`), and pseudo-labeled splits
(:mod:`.pseudo_label_writer`). Nothing is imported here."""
