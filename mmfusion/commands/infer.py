"""`mmfusion caption | answer | retrieve | transcribe`: run a registered model (or checkpoint) on
your images and audio files."""

from __future__ import annotations

import argparse
import sys

from mmfusion.commands.common import add_config_args, config_from_args


def _common(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--model", default=None, metavar="URI",
                   help="checkpoint directory, models:/NAME@ALIAS or models:/NAME/VERSION "
                   "(default: models:/<registry.model_name>@champion)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def register(subparsers) -> None:
    cap = subparsers.add_parser("caption", help="generate a caption for each image",
                                description="Caption image files (JPEG, PNG, ...) with a model.")
    _common(cap)
    cap.add_argument("images", nargs="+", metavar="IMAGE")
    cap.add_argument("--beams", type=int, default=None, help="beam width (default: eval.num_beams)")
    cap.add_argument("--batch-size", type=int, default=16)
    cap.set_defaults(func=run_caption)
    _register_answer(subparsers)
    ret = subparsers.add_parser(
        "retrieve", help="rank a folder of images (or audio clips) by similarity to a text",
        description=('Text-to-image or text-to-audio retrieval:\n'
                     '  mmfusion retrieve --images DIR --text "a dog on a beach"\n'
                     '  mmfusion retrieve --audio DIR --text "a red circle on the left"   (a model with audio)'),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(ret)
    where = ret.add_mutually_exclusive_group(required=True)
    where.add_argument("--images", metavar="DIR", help="a folder of image files")
    where.add_argument("--audio", metavar="DIR", help="a folder of audio files (.wav, .flac, .mp3, .ogg, ...)")
    ret.add_argument("--text", required=True)
    ret.add_argument("--top-k", type=int, default=5)
    ret.add_argument("--rerank-k", type=int, default=None, metavar="K",
                     help="--audio: re-rank the K nearest clips by how well each explains the text, log p(text | "
                          "clip) under the speech decoder, which is then the score printed; 0: cosine similarity "
                          "only (default: eval.audio_rerank_k)")
    ret.set_defaults(func=run_retrieve)
    _register_transcribe(subparsers)
    exp = subparsers.add_parser(
        "explain", help="draw where the model looks for each word it generates",
        description=("Caption an image (or answer --question about it) and draw, for every generated "
                     "word, the decoder's cross-attention over the image patches as a heatmap: a PNG "
                     "grid with the input first and the word under each panel.\n\n"
                     '  mmfusion explain photo.jpg --out photo-attention.png\n'
                     '  mmfusion explain photo.jpg --question "what colour is the circle?"'),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(exp)
    exp.add_argument("image", metavar="IMAGE")
    exp.add_argument("--question", default=None, help="explain the answer to this question instead of a caption")
    exp.add_argument("--out", default=None, metavar="FILE.png",
                     help="where to write the picture (default: IMAGE's name + '-attention.png' in the current directory)")
    exp.set_defaults(func=run_explain)


def _register_answer(subparsers) -> None:
    ans = subparsers.add_parser(
        "answer", help="answer a typed or spoken question about an image",
        description=('Visual question answering, the question typed or spoken (a model with an audio encoder):\n'
                     '  mmfusion answer photo.jpg "what colour is the car?"\n'
                     '  mmfusion answer photo.jpg --audio question.wav'),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(ans)
    ans.add_argument("image", metavar="IMAGE")
    ans.add_argument("question", metavar="QUESTION", nargs="?", default=None, help="the question as text")
    ans.add_argument("--audio", default=None, metavar="QUESTION.wav",
                     help="the question as speech (WAV, FLAC, MP3, Ogg, ...) instead of text")
    ans.set_defaults(func=run_answer)


def _register_transcribe(subparsers) -> None:
    tr = subparsers.add_parser(
        "transcribe", help="transcribe speech in audio files (a model with an audio encoder)",
        description=("Speech recognition: print each file's transcript. Files are cleaned as ingest cleans "
                     "them (any format libsndfile reads, mixed to mono, resampled to the model's rate).\n\n"
                     "  mmfusion transcribe --model models:/mmfusion-audio@champion clip1.wav clip2.flac"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(tr)
    tr.add_argument("audio", nargs="+", metavar="AUDIO")
    tr.add_argument("--beams", type=int, default=None, help="beam width (default: eval.num_beams)")
    tr.add_argument("--batch-size", type=int, default=8)
    tr.set_defaults(func=run_transcribe)


def _predictor(args):
    from pipelines.serve.predict import load_predictor

    cfg = config_from_args(args)
    return cfg, load_predictor(cfg, args.model or f"models:/{cfg.registry.model_name}@champion", args.device)


def run_caption(args: argparse.Namespace) -> int:
    from pipelines.serve.predict import caption

    cfg, p = _predictor(args)
    beams = args.beams or cfg.eval.num_beams
    for path, text in zip(args.images, caption(p, args.images, cfg.eval.max_len, beams, args.batch_size), strict=True):
        print(f"{path}\t{text}")
    return 0


def _fails(error: Exception) -> int:
    print(f"mmfusion: {error}", file=sys.stderr)
    return 2


def run_answer(args: argparse.Namespace) -> int:
    from pipelines.ingest.audioclean import AudioReject
    from pipelines.serve.audio import answer_spoken
    from pipelines.serve.predict import answer

    if (args.question is None) == (args.audio is None):
        return _fails(ValueError('give the question as text or as --audio FILE (one of them), e.g. '
                                 'mmfusion answer photo.jpg "what colour is the car?"'))
    cfg, p = _predictor(args)
    try:
        if args.audio is not None:
            print(answer_spoken(p, args.image, args.audio, cfg.model.max_answer_len))
        else:
            print(answer(p, args.image, args.question, cfg.model.max_answer_len))
    except (AudioReject, ValueError) as e:
        return _fails(e)
    return 0


def run_retrieve(args: argparse.Namespace) -> int:
    from pipelines.ingest.audioclean import AudioReject
    from pipelines.serve.audio import audio_files, retrieve_audio
    from pipelines.serve.predict import image_files, retrieve

    cfg, p = _predictor(args)
    rerank_k = cfg.eval.audio_rerank_k if args.rerank_k is None else args.rerank_k
    try:
        if args.audio is not None:
            found = retrieve_audio(p, audio_files(args.audio), args.text, args.top_k, rerank_k)
        else:
            found = retrieve(p, image_files(args.images), args.text, args.top_k)
    except (AudioReject, ValueError, FileNotFoundError) as e:
        return _fails(e)
    for path, score in found:
        print(f"{score:+.4f}\t{path}")
    return 0


def run_transcribe(args: argparse.Namespace) -> int:
    from pipelines.ingest.audioclean import AudioReject
    from pipelines.serve.audio import transcribe

    cfg, p = _predictor(args)
    try:
        said = transcribe(p, args.audio, cfg.eval.max_len, args.beams or cfg.eval.num_beams, args.batch_size)
    except (AudioReject, ValueError, FileNotFoundError) as e:
        return _fails(e)
    for path, text in zip(args.audio, said, strict=True):
        print(f"{path}\t{text}")
    return 0


def run_explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmcore.data import load_image
    from pipelines.evaluate.explain import explain, save_explanation

    cfg, p = _predictor(args)
    expl = explain(p.model, p.tokenizer, load_image(args.image), args.question, cfg.eval.max_len, p.max_text_len)
    out = save_explanation(expl, args.out or f"{Path(args.image).stem}-attention.png")
    print(f"{'answer' if args.question else 'caption'}: {expl.text}")
    print(f"attention for {len(expl.words)} word(s) drawn in {out}")
    return 0
