"""A leaf module with data-dependent control flow: fxqat falls back from fake-tensor to real shape propagation with
one warning, and torch.fx ShapeProp's traceback of the failed fake run is not printed to stderr."""

import pytest
import torch
from torch import nn

import fxqat


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if float(x.detach().mean()) > 0:  # data-dependent: cannot run on fake tensors
            return self.fc(x)
        return -self.fc(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.g, self.h = nn.Linear(8, 8), Gate(), nn.Linear(8, 2)

    def forward(self, x):
        return self.h(self.g(torch.relu(self.a(x))))


def test_data_dependent_leaf_prepares_with_one_warning_and_no_traceback(capfd):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 8)
    with pytest.warns(UserWarning) as record:
        qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=4, a_bits=4))
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ShapeProp" not in err and "DataDependentOutputException" not in err
    ours = [str(w.message) for w in record if "fxqat.capture.shapes" in str(w.message)]
    assert len(ours) == 1 and "module 'g' (Gate) cannot run on fake tensors" in ours[0]
    assert "\n" not in ours[0]
    # the fallback worked: shapes recorded on every node, and the model matches the FP model with quantizers off
    gate = [n for n in qm.graph.nodes if n.meta.get("fxqat.module") == "g"]  # its opaque weight wrapper
    assert len(gate) == 1 and tuple(gate[0].meta["tensor_meta"].shape) == (4, 8)
    fxqat.set_quantization(qm, False)
    with torch.no_grad():
        for xb in (x, -x.abs() - 1):  # both branches of the gate
            torch.testing.assert_close(qm(xb), model(xb), rtol=0, atol=0)
