"""Building method networks from nnU-Net plans (nnunet_ext.architectures.from_plans): one place, clear errors."""

from __future__ import annotations

import copy
import json

import pytest
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from support.paths import DATA

from nnunet_ext.architectures.banet import BANet
from nnunet_ext.architectures.from_plans import method_network_from_plans
from nnunet_ext.core.errors import UserError


def configuration(edit=None):
    plans = json.loads((DATA / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    arch = cfg["architecture"]["arch_kwargs"]
    arch.update(n_stages=3, features_per_stage=[4, 8, 16], kernel_sizes=[[3, 3, 3]] * 3)
    arch.update(
        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1]
    )
    if edit:
        edit(arch)
    return PlansManager(copy.deepcopy(plans)).get_configuration("3d_fullres")


def build(cm, **method_kwargs):
    name = "nnunet_ext.architectures.banet.BANet"
    return method_network_from_plans("nnUNetTrainerBANet", name, (BANet,), cm, 1, 3, True, method_kwargs)


def test_builds_the_method_network_from_plain_unet_kwargs():
    net = build(configuration())
    assert isinstance(net, BANet)
    assert [s for s in net.encoder.output_channels] == [4, 8, 16]
    assert net.decoder.deep_supervision


def test_method_kwargs_replace_the_plans_values():
    def edit(arch):
        arch["features_per_stage"] = [2, 2, 2]  # overridden below

    net = build(configuration(edit), features_per_stage=[4, 8, 8])
    assert list(net.encoder.output_channels) == [4, 8, 8]


def test_plans_of_another_network_family_are_a_clear_error():
    def foreign(arch):
        arch["num_heads"] = 4

    with pytest.raises(
        UserError, match=r"kwargs it does not know: \['num_heads'\].*default or ResEnc planners"
    ):
        build(configuration(foreign))

    def no_backbone(arch):
        arch.pop("n_conv_per_stage")

    with pytest.raises(UserError, match="neither n_conv_per_stage nor n_blocks_per_stage"):
        build(configuration(no_backbone))
