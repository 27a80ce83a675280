"""The 10-line quick start of the README, runnable: QAT of a torchvision ResNet-18 at W4A4 for a few steps."""

import torch
import torchvision

import fxqat

model = torchvision.models.resnet18(num_classes=10)                      # any nn.Module
x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=4, a_bits=4, method="lsq"))
opt = torch.optim.SGD(fxqat.trainable_parameters(qm), lr=0.01, momentum=0.9)
for step in range(3):
    loss = torch.nn.functional.cross_entropy(qm(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
    print(f"step {step}: loss {loss.item():.3f}")
lp = fxqat.convert(qm.eval())                                            # inference model, weights pre-quantized
print(lp(x).argmax(1))
