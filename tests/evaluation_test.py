"""FID Inception and Frechet distance against pytorch-fid's."""

import warnings

import numpy as np
import pytest
import torch_references

from cvqcar.evaluation import fid, inception


@pytest.fixture(scope="module")
def fid_reference():
  return torch_references.fid_inception()


def test_inception_pool_features_match_pytorch_fid(fid_reference, tmp_path):
  import torch

  model, state = fid_reference
  path = tmp_path / "inception.npz"
  np.savez(path, **state)
  weights = inception.load(str(path))
  rng = np.random.default_rng(0)
  for size in (64, 333):  # upsampled and downsampled to 299
    images = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    ours = np.asarray(inception.features(weights, images))
    with torch.no_grad():
      x = torch.as_tensor((images + 1) / 2).permute(0, 3, 1, 2)
      want = model(x)[0][:, :, 0, 0].numpy()
    assert ours.shape == want.shape == (2, 2048)
    assert np.abs(want).max() > 1e-3 and np.std(want) > 1e-4
    error = np.abs(ours - want).max() / np.abs(want).max()
    assert error <= 1e-4, (size, error)


def test_frechet_distance_matches_pytorch_fid():
  torch_references.pytorch_fid()
  from pytorch_fid.fid_score import calculate_frechet_distance

  rng = np.random.default_rng(0)
  for dim in (4, 64):
    a, b = rng.normal(size=(2, 3 * dim, dim))
    mu1, mu2 = rng.normal(size=(2, dim))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b + 0.3 * a, rowvar=False)
    with warnings.catch_warnings():  # its scipy.sqrtm(disp=False)
      warnings.simplefilter("ignore", DeprecationWarning)
      want = calculate_frechet_distance(mu1, s1, mu2, s2)
    assert want > 0.1
    np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2), want,
                               rtol=1e-10)
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-6


def test_frechet_distance_of_singular_covariances():
  """Fewer images than features: the covariances are singular, where the
  sqrtm of their product (pytorch-fid) drifts; ours stays exact."""
  torch_references.pytorch_fid()
  from pytorch_fid.fid_score import calculate_frechet_distance

  rng = np.random.default_rng(0)
  x = rng.normal(size=(14, 512)) * rng.uniform(0.01, 3, 512)
  sigma, mu = np.cov(x, rowvar=False), x.mean(0)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    drift = calculate_frechet_distance(mu, sigma, mu, sigma)
  assert abs(drift) > 1e-6  # the sqrtm route, on the same statistics
  # A scaled copy: Tr sqrt(s (c^2 s)) = c Tr s exactly.
  want = (1 - 1.5) ** 2 * np.trace(sigma)
  got = fid.frechet_distance(mu, sigma, mu, 1.5 ** 2 * sigma)
  assert got == pytest.approx(want, rel=1e-9)


def test_feature_stats_equal_numpy_and_ignore_padding(tmp_path):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(37, 8))
  stats = fid.FeatureStats(8)
  stats.add(x[:20])
  other = fid.FeatureStats(8)
  padded = np.concatenate([x[20:], rng.normal(size=(5, 8)) * 100])
  other.add(padded, weights=np.r_[np.ones(17), np.zeros(5)])
  stats.merge(fid.FeatureStats.from_arrays(other.arrays()))
  mu, sigma = stats.mu_sigma()
  np.testing.assert_allclose(mu, x.mean(0), atol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), atol=1e-12)
  fid.save_stats(str(tmp_path / "s.npz"), mu, sigma)
  back = fid.load_stats(str(tmp_path / "s.npz"))
  np.testing.assert_array_equal(back[0], mu)
  np.savez(tmp_path / "bad.npz", mean=mu)
  with pytest.raises(ValueError, match=r"lacks \['mu', 'sigma'\]"):
    fid.load_stats(str(tmp_path / "bad.npz"))


def test_lpips_matches_the_lpips_package(tmp_path):
  lp = torch_references.lpips()
  import torch

  from cvqcar.tokenizer import lpips

  torch.manual_seed(0)
  # Random VGG trunk (the ImageNet one would download), the package's own
  # calibrated linear layers (shipped in its wheel).
  ref = lp.LPIPS(net="vgg", pretrained=True, pnet_rand=True,
                 verbose=False).eval()
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  np.savez(tmp_path / "lpips.npz", **lpips.from_torch(state))
  ours = lpips.load(str(tmp_path / "lpips.npz"))
  rng = np.random.default_rng(0)
  x, y = rng.uniform(-1, 1, (2, 3, 48, 48, 3)).astype(np.float32)
  y = np.clip(x + 0.3 * y, -1, 1)
  with torch.no_grad():
    to_t = lambda a: torch.as_tensor(a).permute(0, 3, 1, 2)
    want = ref(to_t(x), to_t(y)).numpy().reshape(-1)
  got = np.asarray(ours(x, y))
  assert want.min() > 1e-4
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_ssim_matches_scikit_image():
  from skimage.metrics import structural_similarity

  from cvqcar import metrics

  rng = np.random.default_rng(2)
  x = rng.uniform(-1, 1, (2, 40, 33, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.4, x.shape), -1, 1).astype(np.float32)
  got = np.asarray(metrics.ssim(x, y))
  for i in range(2):
    want = structural_similarity(
        (x[i] + 1) / 2, (y[i] + 1) / 2, channel_axis=-1, data_range=1.0,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert 0.05 < want < 0.95
    np.testing.assert_allclose(got[i], want, atol=1e-5)


@pytest.mark.slow
def test_convert_weights_command(fid_reference, tmp_path):
  import subprocess
  import sys

  import torch

  _, state = fid_reference
  torch.save({k: torch.as_tensor(v) for k, v in state.items()},
             tmp_path / "pt_inception.pth")
  out = subprocess.run(
      [sys.executable, "-m", "cvqcar.convert_weights",
       f"--inception={tmp_path / 'pt_inception.pth'}",
       f"--out={tmp_path / 'inception.npz'}"], capture_output=True,
      text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  from_pth = inception.load(str(tmp_path / "pt_inception.pth"))
  from_npz = inception.load(str(tmp_path / "inception.npz"))
  for name, (kernel, bias) in from_pth.items():
    np.testing.assert_array_equal(from_npz[name][0], kernel)
    np.testing.assert_array_equal(from_npz[name][1], bias)
