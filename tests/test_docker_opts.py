"""`pyflannel docker-opts` writes what flannel's mk-docker-opts.sh writes (the expected texts are that script's
output for the same subnet.env, v0.13 to v0.20.2)."""
import pytest

from pyflannel import cli, dockeropts, subnetenv

pytestmark = pytest.mark.unit

SUBNET_ENV = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"


@pytest.mark.parametrize("switches, expected", [
    ([], 'DOCKER_OPT_BIP="--bip=10.5.34.1/24"\nDOCKER_OPT_IPMASQ="--ip-masq=false"\nDOCKER_OPT_MTU="--mtu=1450"\n'
         'DOCKER_OPTS=" --bip=10.5.34.1/24 --ip-masq=false --mtu=1450"\n'),
    (["-c"], 'DOCKER_OPTS=" --bip=10.5.34.1/24 --ip-masq=false --mtu=1450"\n'),
    (["-i", "-m"], 'DOCKER_OPT_BIP="--bip=10.5.34.1/24"\nDOCKER_OPT_MTU="--mtu=1450"\n'),
    (["-c", "-k", "FOO"], 'FOO=" --bip=10.5.34.1/24 --ip-masq=false --mtu=1450"\n'),
])
def test_the_file_is_mk_docker_opts_s(tmp_path, monkeypatch, switches, expected):
    monkeypatch.delenv("DOCKER_OPTS", raising=False)
    (tmp_path / "subnet.env").write_text(SUBNET_ENV)
    out = tmp_path / "docker_opts.env"
    assert cli.main(["docker-opts", "-f", str(tmp_path / "subnet.env"), "-d", str(out), *switches]) == 0
    assert out.read_text() == expected


def test_options_already_in_the_environment_come_first(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_OPTS", "--debug")
    (tmp_path / "subnet.env").write_text(SUBNET_ENV)
    out = tmp_path / "docker_opts.env"
    assert cli.main(["docker-opts", "-f", str(tmp_path / "subnet.env"), "-d", str(out), "-c"]) == 0
    assert out.read_text() == 'DOCKER_OPTS="--debug  --bip=10.5.34.1/24 --ip-masq=false --mtu=1450"\n'


def test_docker_masquerades_only_when_flannel_does_not():
    env = subnetenv.parse(SUBNET_ENV.replace("IPMASQ=true", "IPMASQ=false"))
    assert dockeropts.options(env)["DOCKER_OPT_IPMASQ"] == "--ip-masq=true"


def test_a_missing_subnet_env_is_one_clear_line(tmp_path, capsys):
    out = tmp_path / "docker_opts.env"
    assert cli.main(["docker-opts", "-f", str(tmp_path / "none.env"), "-d", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyflannel docker-opts: ") and "none.env" in err and err.count("\n") == 1
    assert not out.exists()
