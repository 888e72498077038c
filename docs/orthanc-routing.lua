-- Orthanc auto-routing to the RadVLM node (tested by tests/test_node_orthanc.py).
-- Chest CR/DX images are forwarded to the DICOM modality "radvlm" (see docs/orthanc-routing.md).
-- The node's results (SR, GSPS) come back as modality SR/PR and are never routed.

local CHEST = { CHEST = true, THORAX = true, LUNG = true }

function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags['Modality'] or ''
  if modality ~= 'CR' and modality ~= 'DX' then
    return
  end
  local body = string.upper(tags['BodyPartExamined'] or '')
  if body ~= '' and not CHEST[body] then
    return
  end
  -- an asynchronous Orthanc job: retried by Orthanc's job engine, visible under /jobs
  RestApiPost('/modalities/radvlm/store',
              '{"Resources": ["' .. instanceId .. '"], "Synchronous": false}')
end
