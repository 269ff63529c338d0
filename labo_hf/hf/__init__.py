"""The Hugging Face layer: the loss glued into transformers (and trl), on top of ``labo_hf.loss``.

``model_loss`` (the loss of a model's outputs, one implementation for every way in) and ``lm_head`` (capturing
the final hidden states for the fused loss) -> ``apply`` (``apply_labo``: a model's own loss) and ``arguments``
-> ``loss_mixin`` (the loss and its statistics), ``run_guard`` (run identity, atomic ``checkpoints``,
``run_record``, resume; ``safe_files`` for labo-hf's own files and full disks) and ``model_card`` -> ``trainers`` and ``sft_trainer`` (trl, optional). ``_compat`` holds
every workaround for transformers behaviour, with its version. Import the submodules directly: importing this
package imports nothing (transformers takes seconds to import).
"""
