"""Tiny fine-tuning settings shared by tests that run whole benchmarks (seconds per seed)."""

TINY_FINETUNE = (
    # the probe tier has its own tests (tests/benchmark/probe); these runs time the detector
    "probe.probes=[]",
    "finetune.batch_size=2",
    "finetune.warmup_iters=2",
    "finetune.precise_bn_iters=2",
    "finetune.num_workers=0",
    "finetune.log_every=2",
    "finetune.checkpoint_every=2",
    "finetune.rpn_pre_nms_top_n_train=100",
    "finetune.rpn_post_nms_top_n_train=50",
    "finetune.rpn_pre_nms_top_n_test=100",
    "finetune.rpn_post_nms_top_n_test=50",
    "finetune.box_batch_size_per_image=32",
    "finetune.glas.synthetic_train=4",
    "finetune.glas.synthetic_test=2",
    "finetune.glas.synthetic_height=96",
    "finetune.glas.synthetic_width=128",
    "finetune.glas.iterations=4",
    "finetune.glas.steps=[3]",
    "finetune.glas.min_size_train=[80,96]",
    "finetune.glas.min_size_test=96",
    "finetune.glas.max_size=128",
)

#: A tissue probe on the smallest synthetic sets that still hold every class (tests only).
TINY_TISSUE_PROBE = (
    "probe.batch_size=16",
    "probe.num_workers=0",
    "probe.tissue.synthetic=true",
    "probe.tissue.synthetic_train=27",
    "probe.tissue.synthetic_test=9",
    "probe.tissue.synthetic_size=32",
    "probe.tissue.train_per_class=2",
    "probe.tissue.knn_k=3",
)
