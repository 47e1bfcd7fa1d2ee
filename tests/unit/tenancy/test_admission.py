import pytest

from server.core.errors import APIError
from server.engine.routing import Backend
from server.tenancy.admission import Admission
from tests.helpers.in_process import FakeEngine


def test_admission_bounds_engine_and_tenant():
    adm = Admission(per_engine=3, per_tenant=2, retry_after=7)
    b = Backend(FakeEngine(), up=True)
    with adm.admit("acme", b), adm.admit("acme", b):
        with pytest.raises(APIError) as e:
            with adm.admit("acme", b):
                pass
        assert e.value.status == 429 and e.value.headers == {"Retry-After": "7"} and "tenant" in e.value.message
        with adm.admit(None, b):  # open mode: no tenant bound, the engine's still holds
            with pytest.raises(APIError, match="engine"):
                with adm.admit("globex", b):
                    pass
    assert b.in_flight == 0 and adm.tenants == {}
