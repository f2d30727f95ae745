"""Transfer stage: ConCL's R18-FPN Mask R-CNN (detectron2 "1x" configs) rebuilt on torchvision.

``model`` builds the detector and loads pre-trained ``backbone.pth`` weights, ``precise_bn``
re-estimates BatchNorm statistics before evaluation (``TEST.PRECISE_BN``), ``evaluate`` scores
boxes and masks with COCO AP, and ``detectron2`` converts weights to and from detectron2's
``.pkl`` format to run ConCL's original code.
"""
