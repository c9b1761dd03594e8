"""The README example: one f, trained as a ResNet, evaluated as an ODE, and back."""
import torch
from torch import nn
import odenet

torch.manual_seed(0)
f = odenet.MLPDynamics(dim=2, hidden=32)                  # dx/dt = f(t, x)
model = nn.Sequential(nn.Linear(2, 2), *[odenet.ResBlock(f, h=1 / 4, t=i / 4) for i in range(4)], nn.Linear(2, 2))
x, y = torch.randn(256, 2), torch.randint(0, 2, (256,))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(50):                                       # train the discrete ResNet (4 Euler steps)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()

resnet_out = model(x)
model = odenet.swap_blocks(model, solver="dopri5", rtol=1e-4, atol=1e-4)  # same f, adaptive solver
ode_out = model(x)
print("NFE per ODE block:", [m.last_stats.nfe_forward for m in model if isinstance(m, odenet.ODEBlock)])
print("max |ResNet - ODE| output:", (resnet_out - ode_out).abs().max().item())
model = odenet.swap_blocks(model, solver="euler", steps=1)                # and back (bit for bit in float32)
print("back to ResNet exactly:", torch.equal(model(x), resnet_out))
