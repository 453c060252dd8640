"""Prompt-following score of a CAR model: a classifier labels its samples.

  python -m cvqcar.prompt_following --car=exports/car2_fashion \
      --tokenizer=exports/cvq_fashion --out=samples/fashion

For each Fashion-MNIST class, --per_class samples are drawn for the
held-out prompt ("an image of a sandal": a phrasing never used in
training) and for a training phrasing ("a photo of a sandal"). A CNN
trained on the real training images (cvqcar.evaluation.classifier; trained
once, then read from --classifier) labels them: the share labelled with
the prompt's class is the prompt-following accuracy, printed beside chance
(1 / 10) and the classifier's own accuracy on the real test images. OUT
gets prompt_following.json and prompt_grid.png (a row of samples per
class, held-out phrasing). --car takes a CAR export or a training workdir.
A class-conditional CAR (car_stage1.py:tiny,c2i,fashion) is prompted with
each class index instead, and its grid is titled with the class names.
"""

from __future__ import annotations

import json
import logging
import os

import ml_collections
import numpy as np
from absl import app, flags

from cvqcar import fingerprint, logs, visualize
from cvqcar.car import figures as car_figures
from cvqcar.car import sampler as car_sampler
from cvqcar.car import sampling
from cvqcar.car import trainer as car_trainer
from cvqcar.data import fashion, text
from cvqcar.data import images as image_data
from cvqcar.evaluation import classifier as classifier_lib
from cvqcar.tokenizer import export


def real_images(data_dir: str, split: str, resolution: int):
  """(images [N, R, R, 3] in [-1, 1], labels [N]) as the pipelines see
  them (center crop, resized to R)."""
  preprocess = image_data.Preprocess(resolution, crop="center")
  records = fashion.records(data_dir, split)
  images = np.stack([preprocess(r, None)["image"] for r in records])
  return images, np.array([r["label"] for r in records])


def load_classifier(path: str, data_dir: str, resolution: int,
                    steps: int = 2000):
  """The classifier export at `path`, trained on the real training images
  (and written there) if it does not exist yet."""
  if os.path.exists(os.path.join(path, "config.json")):
    return classifier_lib.load(path)
  images, labels = real_images(data_dir, "train", resolution)
  model = classifier_lib.train(images, labels, len(fashion.CLASSES),
                               steps=steps)
  test_images, test_labels = real_images(data_dir, "test", resolution)
  test_accuracy = classifier_lib.accuracy(model, test_images, test_labels)
  logging.info("classifier: %.1f%% on the %d real test images",
               100 * test_accuracy, len(test_labels))
  classifier_lib.save(model, path, classes=list(fashion.CLASSES),
                      resolution=resolution, test_accuracy=test_accuracy)
  return classifier_lib.load(path)


def load_car(path: str, mesh: str = "", param_dtype: str = "bfloat16"
             ) -> car_sampler.Sampler:
  """A CAR export or training workdir on --mesh=`mesh` in `param_dtype`."""
  if os.path.isdir(os.path.join(path, "checkpoints")):
    model, config = car_trainer.load_from_workdir(path)
    return car_sampler.Sampler.from_model(model, config, mesh, param_dtype)
  return car_sampler.Sampler.load(path, mesh, param_dtype)


def score_prompts(sample, classify, template: str, per_class: int
                  ) -> tuple[dict, list[str], np.ndarray]:
  """Prompts every class through `template`, samples `per_class` images
  each (`sample(prompts, per_class)` -> [P, N, R, R, 3]) and labels them
  (`classify(images [M, R, R, 3])` -> class ids [M]): returns
  ({'template', 'accuracy', 'per_class'}, the prompts, the images).
  template None prompts a class-conditional CAR with the class index."""
  classes = range(len(fashion.CLASSES))
  prompts = [str(c) if template is None else fashion.caption(c, template)
             for c in classes]
  images = np.asarray(sample(prompts, per_class))
  if images.shape[:2] != (len(prompts), per_class):
    raise ValueError(f"sample gave {images.shape[:2]} images, not"
                     f" {(len(prompts), per_class)} (prompts, per prompt)")
  predicted = np.asarray(classify(
      images.reshape((-1,) + images.shape[2:]))).reshape(
          len(prompts), per_class)
  hits = predicted == np.arange(len(prompts))[:, None]
  result = {"template": template, "accuracy": float(hits.mean()),
            "per_class": {fashion.CLASSES[c]: float(hits[c].mean())
                          for c in classes}}
  return result, prompts, images


def run(car_path: str, tokenizer_path: str, out: str, *,
        classifier_path: str, data_dir: str = "", per_class: int = 20,
        seed: int = 0, allow_tokenizer_mismatch: bool = False,
        mesh: str = "", param_dtype: str = "bfloat16", **settings) -> dict:
  """Samples, scores and writes OUT/prompt_following.json and the grid;
  returns the results. A tokenizer export other than the one CAR was
  trained with is refused unless `allow_tokenizer_mismatch`."""
  fingerprint.check_record(
      car_path, export.tokenizer_record(tokenizer_path), "the CAR model",
      allow=allow_tokenizer_mismatch, opt_out=fingerprint.FLAG_OPT_OUT,
      warn_if_missing=True)
  model = load_car(car_path, mesh, param_dtype)
  config = model.config
  tokenizer = export.load_tokenizer(tokenizer_path, expect=(
      ml_collections.ConfigDict({"model": config.tokenizer})))
  text_tok = text.load_text_tokenizer(config.text_tokenizer)
  clf, clf_config = load_classifier(classifier_path, data_dir,
                                    tokenizer.resolution)
  results = {"chance": 1 / len(fashion.CLASSES), "per_class": per_class,
             "classifier_test_accuracy": clf_config.info.test_accuracy,
             "settings": settings, "seed": seed}

  def sample(prompts, n):
    return car_figures.car_samples(
        model, tokenizer, text_tok, prompts, per_prompt=n, seed=seed,
        max_text_len=config.max_text_len, **settings)[1]

  phrasings = ((("class", None),) if config.get("num_classes", 0) else
               (("held_out", fashion.HELD_OUT_TEMPLATE),
                ("train", fashion.TRAIN_TEMPLATES[0])))
  for name, template in phrasings:
    results[name], prompts, images = score_prompts(
        sample, lambda x: classifier_lib.predict(clf, x), template,
        per_class)
    what = "class indices" if template is None else f"'{template}'"
    print(f"{name} prompts ({what}): {results[name]['accuracy']:.1%}"
          f" of {images.shape[0] * images.shape[1]} samples show the"
          f" prompt's class (chance {results['chance']:.0%})", flush=True)
    if name != "train":
      titles = ([f"{c}: {fashion.CLASSES[c]}" for c in range(len(prompts))]
                if template is None else [f'"{p}"' for p in prompts])
      grid = visualize.strip_grid(images[:, :min(per_class, 8)], min_tile=64,
                                  row_titles=titles)
      results["grid"] = visualize.save_png(
          grid, os.path.join(out, "prompt_grid.png"))
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "prompt_following.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


def _define_flags() -> None:
  """The command's flags, defined only when run as one: importing
  score_prompts or run defines none (other commands share names)."""
  flags.DEFINE_string("car", None, "CAR export or training workdir.")
  flags.DEFINE_string("tokenizer", None, "Its tokenizer export.")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_string(
      "classifier", "exports/fashion_classifier",
      "Classifier export: read if present, else trained and written here.")
  flags.DEFINE_string("data_dir", "", "Fashion-MNIST IDX files; empty:"
                      " where Debian's package puts them.")
  flags.DEFINE_integer("per_class", 20, "Samples per prompt.")
  flags.DEFINE_float("cfg_scale", 3.0, "1 = no guidance.")
  flags.DEFINE_enum("cfg_schedule", "constant",
                    list(sampling.CFG_SCHEDULES), "Guidance over the C"
                    " channel steps: cfg_scale at every step, or ramped from"
                    " cfg_scale (first channel) to 1 (last) linearly or as"
                    " a half cosine.")
  flags.DEFINE_float("temperature", 1.0, "0 = greedy.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_string("mesh", "", "Sampling mesh, e.g. 'fsdp=4,model=2';"
                      " default: this process's devices over data.")
  flags.DEFINE_enum("param_dtype", "bfloat16", ["bfloat16", "float32"],
                    "The dtype the weights are read in for sampling.")
  flags.DEFINE_bool("allow_tokenizer_mismatch", False, "Sample with a"
                    " tokenizer export other than the one CAR was trained"
                    " with.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.setup()
  f = flags.FLAGS
  run(f.car, f.tokenizer, f.out, classifier_path=f.classifier,
      data_dir=f.data_dir, per_class=f.per_class, seed=f.seed,
      cfg_scale=f.cfg_scale, cfg_schedule=f.cfg_schedule,
      temperature=f.temperature,
      allow_tokenizer_mismatch=f.allow_tokenizer_mismatch, mesh=f.mesh,
      param_dtype=f.param_dtype)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["car", "tokenizer", "out"])
  app.run(main)
