"""Demo of knowledge distillation on the synthetic set: a smaller student learns from a demo teacher's logits.

    python train.py --config configs/demo.py --workdir workdir/demo
    convnext-audio predict --checkpoint workdir/demo --data demo@train --output workdir/demo_teacher.h5
    python train.py --config configs/demo_kd.py --workdir workdir/demo_kd \
        --config.distill.teacher=workdir/demo_teacher.h5

Step 1 trains the teacher (configs/demo.py, 8192 training clips); step 2 writes its logits for the 4096 clips
of ``demo@train`` as ``predict`` opens it (DataOptions' default: 4096 clips, seed 0; the workdir resolves to
model/best); step 3 trains the student on those 4096 clips with loss λ·BCE(labels) + (1 − λ)·BCE(σ(s/T), σ(t/T)),
λ = 0.1, T = 1 (Schmid et al.). The demo clips depend on ``config.seed`` but their ids do not: keep seed 0 for
all three steps, or the teacher's rows belong to other audio. Student: dims 12-24-48-96, one block per stage
(three quarters of the demo teacher's width, 58 % of its parameters); the rest as configs/demo.py.

Expected result: none measured with these full sizes. Measured with reduced sizes by
tests/test_training_distill.py::test_demo_distillation_experiment (teacher: configs/demo.py as shipped, validation
mAP 0.9814; its teacher file for the first 1024 training clips; students trained 480 steps on those clips with
half of their positive labels cleared; the demo's 512 validation clips), on an Intel Xeon @ 2.80GHz (2 cores,
8 simulated devices): the student distilled with label_weight = 0 reaches 0.9208 (93.8 % of the teacher); the same
student trained on the half labels alone 0.7649.
"""

from configs.demo import get_config as demo_config


def get_config():
    config = demo_config()
    config.model.overrides.dims = (12, 24, 48, 96)
    config.data.demo_train_clips = 4096  # the clips `convnext-audio predict --data demo@train` scores
    config.distill.teacher = ""  # the teacher file (set on the command line; "" trains on labels only)
    config.distill.label_weight = 0.1  # λ, Schmid et al.
    config.distill.temperature = 1.0  # T, Schmid et al.
    config.distill.allow_missing = False
    return config
