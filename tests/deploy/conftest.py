"""Fixtures of the deployment tests: one provisioned PKI and one tiny data set per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedrad.lab.synth import SiteSpec, generate
from fedrad.server.provision import provision
from tests.deploy.deployment import Deployment
from tests.helpers import small_site_policy

SITES = ("a", "b", "c")


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    """CA, coordinator certificate (localhost/127.0.0.1), bundles for a, b, c and an unregistered 'rogue'."""
    certs = tmp_path_factory.mktemp("certs")
    provision(certs, sites=[*SITES, "rogue"])
    return certs


@pytest.fixture(scope="session")
def site_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    specs = [SiteSpec(name=n, n_patients=16, prevalence=0.5, spacing_mm=s, noise_hu=10, kernel=k, hu_offset=o,
                      manufacturer="GE")
             for n, s, k, o in (("a", 0.7, "smooth", 0), ("b", 0.9, "sharp", 30), ("c", 0.8, "smooth", -20))]
    generate(root, sites=specs, seed=2, image_size=96)
    small_site_policy(root)
    return root


@pytest.fixture
def deployment(tmp_path, pki, site_data, request):
    """A fresh coordinator state per test (the PKI is shared); every process stopped by PID at the end."""
    dep = Deployment(tmp_path, pki, site_data)
    request.addfinalizer(dep.close)
    return dep
