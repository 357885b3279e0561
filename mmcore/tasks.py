"""The names of the model's tasks (`FusionModel.forward(batch, task)`), apart from the model so
that code which only needs the names (the CLI's argument choices, config checks) imports no torch.
"""

AUDIO_TASKS = ("asr", "audio_retrieval", "spoken_vqa", "audio_caption")  # need `cfg.audio`
TASKS = ("pretrain", "caption", "vqa", "retrieval", *AUDIO_TASKS)
