"""The 2D backbone: the shared call signature and CTM's zero-initialised s-path."""
import pytest
import torch

from networks.mlp import MLP


@pytest.mark.parametrize("batch", [1, 3])
def test_mlp_output_has_the_input_shape_with_and_without_labels_and_s(batch):
    x, c = torch.randn(batch, 2), torch.randn(batch)
    labels = torch.nn.functional.one_hot(torch.arange(batch) % 4, 4).float()
    assert MLP()(x, c).shape == (batch, 2)
    assert MLP(label_dim=4)(x, c, labels).shape == (batch, 2)
    assert MLP(s_embedding=True)(x, c, None, torch.randn(batch)).shape == (batch, 2)


def test_mlp_s_path_is_zero_at_init_so_the_output_does_not_depend_on_s():
    torch.manual_seed(0)
    net = MLP(s_embedding=True)
    x, c = torch.randn(16, 2), torch.randn(16)
    torch.testing.assert_close(net(x, c, None, torch.randn(16)), net(x, c, None, torch.randn(16)), rtol=0, atol=0)


def test_teacher_weights_load_into_an_s_student_with_only_the_s_keys_missing():
    teacher, student = MLP(), MLP(s_embedding=True)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and missing and all("_s" in k for k in missing)
    x, c = torch.randn(8, 2), torch.randn(8)
    torch.testing.assert_close(student(x, c, None, torch.randn(8)), teacher(x, c), rtol=0, atol=0)


def test_mlp_refuses_an_s_label_without_the_s_path():
    with pytest.raises(ValueError, match="s_embedding"):
        MLP()(torch.randn(2, 2), torch.randn(2), None, torch.randn(2))
